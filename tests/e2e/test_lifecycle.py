"""Start-up, drain and shutdown of the real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc import envoyconf, up

from ..tollway_up import UpRun, children, gone
from .conftest import Stack
from .test_front_door import CHAT, chat_status, eventually, post

pytestmark = pytest.mark.e2e


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=envoyconf.SERVICE_NAME)
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status)
        except grpc.RpcError:
            return -1  # unreachable


def test_sigterm_drains_then_envoy_fails_closed(fresh_stack: Stack) -> None:
    stack, port = fresh_stack, fresh_stack.gateway.config.server.port
    alice = {"authorization": f"Bearer {fresh_stack.keys['alice']}"}
    assert health(port) == health_pb2.HealthCheckResponse.SERVING

    fresh_stack.tollway.send_signal(signal.SIGTERM)
    eventually(lambda: health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=2)
    admin = stack.gateway.config.envoy.admin_port
    eventually(lambda: not up.extproc_healthy(admin), timeout=3)

    # The only replica is out: Envoy fails closed rather than sending it traffic in panic
    # mode (healthy_panic_threshold 0); with other replicas, traffic moves to them. The
    # workers see the health change a moment after the admin endpoint does.
    def refused() -> httpx.Response | None:
        r = post(stack, "/v1/chat/completions", alice)
        return r if r.status_code == 503 else None

    assert eventually(refused, timeout=3).json()["error"]["code"] == "service_unavailable"

    assert fresh_stack.tollway.wait(timeout=15) == 0
    r = post(stack, "/v1/chat/completions", alice)
    assert r.status_code == 503  # fail closed, as an OpenAI-style error
    assert r.json()["error"]["code"] == "service_unavailable"


def test_tollway_up_demo_serves_and_stops_cleanly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        text=True,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
        eventually(lambda: any("Ctrl-C" in line for line in lines) or proc.poll() is not None, 60)
        out = "".join(lines)
        url = re.search(r"front door\s+(http://\S+)", out)
        key = re.search(r"demo key\s+(tw_\S+)", out)
        assert url and key, out
        assert f"curl -s {url[1]}/v1/chat/completions" in out

        client = openai.OpenAI(base_url=f"{url[1]}/v1", api_key=key[1], max_retries=0, timeout=10)
        assert client.chat.completions.create(**CHAT).choices[0].message.content  # type: ignore[call-overload]
        streamed = client.chat.completions.create(**CHAT, stream=True)  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        wrong = httpx.post(
            f"{url[1]}/v1/chat/completions",
            json=CHAT,
            timeout=10,
            headers={"authorization": "Bearer tw_wrong"},
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

        kids = children(proc.pid)
        assert len(kids) == 3  # demo upstream, tollway serve, envoy
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        for pid in kids:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    """Even SIGKILL of `tollway up` leaves no orphans (PR_SET_PDEATHSIG)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        kids = eventually(lambda: len(children(proc.pid)) == 3 and children(proc.pid), timeout=30)
    finally:
        proc.kill()
        proc.wait()
    eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in kids), timeout=15)
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_child_whose_supervisor_died_before_it_started_never_runs() -> None:
    """`tollway up` killed between fork and PR_SET_PDEATHSIG: the signal would never come."""
    gone = os.getpid() + 1  # stands for a parent that is no longer ours
    child = subprocess.Popen(["sleep", "30"], preexec_fn=up._die_with(gone))
    try:
        assert child.wait(timeout=10) == 1
    finally:
        child.kill()


def _up(tmp_path: Path, *extra: str) -> UpRun:
    argv = [sys.executable, "-m", "extproc", "up", "--demo", "--port", "0", *extra]
    return UpRun(argv, cwd=tmp_path)


def test_keys_created_while_the_demo_runs_reach_it(tmp_path: Path) -> None:
    """The demo uses ./tollway-keys.yaml, printed in the banner, so `tollway keys create`
    in the same folder reaches it; a second demo revokes the first demo key."""
    (tmp_path / "tollway-keys.yaml").write_text("keys: []\n")  # an operator's file, kept
    run = _up(tmp_path)
    try:
        run.wait_banner()
        assert Path(run.keys_file) == tmp_path / "tollway-keys.yaml"
        created = subprocess.run(
            [sys.executable, "-m", "extproc", "keys", "create", "--name", "me"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert created.returncode == 0, created.stderr
        mine = created.stdout.strip()
        eventually(lambda: chat_status(run.url, mine) == 200, timeout=5)
        assert chat_status(run.url, run.key) == 200
        first_demo_key = run.key
        assert run.interrupt() == 0
        run = _up(tmp_path)
        run.wait_banner()
        assert run.key != first_demo_key
        assert chat_status(run.url, run.key) == 200 and chat_status(run.url, mine) == 200
        assert chat_status(run.url, first_demo_key) == 401  # revoked by id, not by name
    finally:
        run.kill()


def test_the_demo_shows_its_limits_and_answers_the_next_request_with_429(tmp_path: Path) -> None:
    run = _up(tmp_path)
    try:
        banner = run.wait_banner()
        assert "limits: 30 requests a minute, $0.05 a day" in banner
        client = openai.OpenAI(base_url=f"{run.url}/v1", api_key=run.key, max_retries=0)
        for _ in range(30):
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert caught.value.response.headers["x-ratelimit-limit-requests"] == "30"
        assert "key_rpm" in caught.value.message
    finally:
        run.kill()


def test_replicas_that_would_each_count_limits_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text("limits:\n  - {name: rpm, by: [key], requests: 5, per: minute}\n")
    argv = [sys.executable, "-m", "extproc", "up", "-c", str(config), "--replicas", "2"]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "set store.redis" in done.stderr and "limits (rpm)" in done.stderr


def _serve_child(pid: int) -> int:
    for child in children(pid):
        if b"serve" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
            return child
    return 0  # between a crash and the restart


def test_a_crashed_tollway_serve_is_restarted(tmp_path: Path) -> None:
    run = _up(tmp_path)
    try:
        run.wait_banner()
        assert chat_status(run.url, run.key) == 200
        serve = _serve_child(run.proc.pid)
        os.kill(serve, signal.SIGKILL)
        eventually(lambda: _serve_child(run.proc.pid) not in (0, serve), timeout=5)
        eventually(lambda: chat_status(run.url, run.key) == 200, timeout=10)
        log = run.stderr()
        assert "tollway up: tollway serve exited with code -9; restart 1 in 0.5s" in log, log
        assert "tollway up: tollway serve restarted (restart 1)" in log
        assert len(children(run.proc.pid)) == 3
        assert run.interrupt() == 0
    finally:
        run.kill()


def test_envoy_exiting_stops_everything_and_says_so(tmp_path: Path) -> None:
    run = _up(tmp_path)
    try:
        run.wait_banner()
        kids = children(run.proc.pid)
        envoy = next(c for c in kids if b"envoy" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(envoy, signal.SIGKILL)
        assert run.proc.wait(timeout=30) == 1
        eventually(lambda: "envoy exited with code -9; stopping" in run.stderr(), timeout=5)
        eventually(lambda: all(gone(pid) for pid in kids), timeout=15)
    finally:
        run.kill()


def test_up_with_a_relative_config_uses_the_files_beside_it(tmp_path: Path) -> None:
    """`cd mydir; tollway keys create --name me; tollway up -c cfg.yaml`: the key works
    (the config is rewritten into a temporary folder; its paths must not move with it)."""
    mydir = tmp_path / "mydir"
    mydir.mkdir()
    port = up.free_port()
    argv = [sys.executable, "-m", "extproc", "demo-upstream", "--port", str(port)]
    demo = up.spawn([*argv, "--provider-key", "sk-relative"])
    upstream = {"url": f"http://127.0.0.1:{port}", "credential": {"env": "RELATIVE_TEST_KEY"}}
    config = {"auth": {"keys_file": "tollway-keys.yaml"}, "upstreams": {"openai": upstream}}
    (mydir / "cfg.yaml").write_text(yaml.safe_dump(config))
    created = subprocess.run(
        [sys.executable, "-m", "extproc", "keys", "create", "--name", "me"],
        cwd=mydir,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert created.returncode == 0, created.stderr
    env = {**os.environ, "RELATIVE_TEST_KEY": "sk-relative"}
    run = UpRun(
        [sys.executable, "-m", "extproc", "up", "-c", "cfg.yaml", "--port", "0"], mydir, env
    )
    try:
        run.wait_banner()
        assert Path(run.keys_file) == mydir / "tollway-keys.yaml"
        eventually(lambda: chat_status(run.url, created.stdout.strip()) == 200, timeout=10)
        assert "no API keys" not in run.stderr()
        assert run.interrupt() == 0
    finally:
        run.kill()
        up.stop_all([demo])
