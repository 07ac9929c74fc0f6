"""What a client sees when one of several Tollway replicas is killed under load.

Starts `tollway up`'s topology (Envoy, N replicas, the demo upstream) with its
supervisor, keeps C requests in flight (metered chat completions), SIGKILLs
replica #2 after a third of the run and counts every answer by status, with the
Envoy response details of each failure. Run:
    .venv/bin/python bench/replica_kill.py [--replicas 2] [--concurrency 16] [--duration 9]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx

from extproc import keys, up
from extproc.config import Config, EnvoyConfig, MetricsConfig, ServerConfig

# Envoy's counters of the Tollway cluster: streams, retries, refused connects, ejections.
STATS = (
    r"^cluster\.tollway_extproc\.(upstream_rq_total|upstream_rq_retry$|upstream_rq_retry_success"
    r"|upstream_cx_connect_fail|outlier_detection\.ejections_enforced_total)"
)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello."}]}


async def _load(
    url: str, key: str, concurrency: int, until: float, out: list[tuple[float, int]]
) -> None:
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:

        async def worker() -> None:
            while time.monotonic() < until:
                try:
                    status = (await client.post("/v1/chat/completions", json=CHAT)).status_code
                except httpx.HTTPError:
                    status = 0
                out.append((time.monotonic(), status))

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _supervise(supervisor: up.Supervisor, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        supervisor.check()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=9.0)
    p.add_argument("--no-kill", action="store_true", help="the same load, nothing killed")
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tollway-kill-"))
    key, record = keys.generate(name="bench", tenant="bench")
    keys.add(workdir / "keys.yaml", record)
    config = Config(
        server=ServerConfig(port=0, replicas=args.replicas, drain_delay_s=0),
        metrics=MetricsConfig(port=0),
        envoy=EnvoyConfig(port=0, admin_port=0),
        auth={"keys_file": workdir / "keys.yaml"},  # type: ignore[arg-type]
    )
    gateway = up.start(config, workdir, demo=True, log_to_files=True)
    stop = threading.Event()
    threading.Thread(target=_supervise, args=(up.Supervisor(gateway), stop), daemon=True).start()
    try:
        start = time.monotonic()
        kill_at = start + args.duration / 3
        answers: list[tuple[float, int]] = []

        def kill() -> None:
            time.sleep(max(0.0, kill_at - time.monotonic()))
            gateway.children[gateway.replicas[1].name].proc.send_signal(signal.SIGKILL)

        if not args.no_kill:
            threading.Thread(target=kill, daemon=True).start()
        until = start + args.duration
        asyncio.run(_load(gateway.url, key, args.concurrency, until, answers))
        time.sleep(1.5)  # Envoy's access log is flushed every second
        by_status = collections.Counter(status for _, status in answers)
        failed = [t - kill_at for t, status in answers if status != 200]
        log = (workdir / "envoy.log").read_text().splitlines()
        details = collections.Counter(
            (entry["status"], entry["details"])
            for entry in map(json.loads, (line for line in log if line.startswith("{")))
            if entry["status"] != 200 and entry["path"] != "/healthz"
        )
        print(f"replicas {args.replicas}, concurrency {args.concurrency}, {args.duration:g} s")
        print(f"answers {len(answers)} ({len(answers) / args.duration:.0f}/s): {dict(by_status)}")
        if failed:
            print(f"failures from {min(failed):+.3f}s to {max(failed):+.3f}s after the kill")
        print(f"envoy details of failures: {dict(details)}")
        admin = f"http://127.0.0.1:{gateway.config.envoy.admin_port}"
        stats = urllib.request.urlopen(f"{admin}/stats?filter={STATS}", timeout=5)  # noqa: S310
        print(stats.read().decode().strip())
    finally:
        stop.set()
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
