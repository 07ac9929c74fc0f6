"""Side-by-side benchmark: plain Envoy vs Envoy + Tollway, same fast upstream.

Three kinds of request (auth only, a metered JSON chat, a metered SSE stream), each
under wrk load on both fronts, plus a sequential probe of time to first byte of a
stream. On request, the chat and the stream again with three limit rules on, through
a second Tollway whose quota store is a real redis-server or its own memory, so that
the cost of limits reads as a difference against the same scenario in the same run;
and a 2 KB chat with and without redaction (`chat-2k`, `chat+redaction`), the same way.
Run: .venv/bin/python bench/run.py [--duration 10] [--rounds 2] [--quick] [--scenarios ...]
See bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc import envoyconf, keys, up
from extproc.config import Config

Proc = subprocess.Popen[bytes]
PATH = "/v1/chat/completions"
REQUEST_BODY = (
    '{"model": "gpt-4o-mini", "max_tokens": 16, '
    '"messages": [{"role": "user", "content": "Say hello."}]}'
)
CHAT_COMPLETION = (
    '{"id": "chatcmpl-bench0001", "object": "chat.completion", "created": 1700000000, '
    '"model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_bench", "choices": '
    '[{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you '
    'today?"}, "logprobs": null, "finish_reason": "stop"}], '
    '"usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20}}'
)
# A 2 KB chat of four messages (a support conversation) for redaction: with an email, a
# card and a phone in the last message, or with words of the same length instead.
EMAIL, CARD, PHONE = "jane.doe@example.com", "4111 1111 1111 1111", "+1 415 555 0132"
NEUTRAL = {EMAIL: "the usual work inbox", CARD: "my usual debit card", PHONE: "my mobile phone"}
_SYSTEM = (
    "You are the customer-support assistant of Northwind Outfitters, an online shop for "
    "outdoor clothing and camping gear. Answer briefly and in a friendly tone. Never ask "
    "for a full card number or a password. When an order cannot be found, ask for the "
    "order number and for the email address used at checkout. Refunds go back to the "
    "original payment method within five to seven working days; exchanges are free "
    "within thirty days of delivery if the item is unworn and has its labels."
)
_FIRST = (
    "Hi! I ordered a waterproof hiking jacket, size medium, in dark green, about two "
    "weeks ago. The tracking page has said 'label created' since the first day and "
    "nothing has moved since. I need the jacket for a trip to the mountains at the end "
    "of next week, so I am getting a little worried. Could you check what happened?"
)
_ANSWER = (
    "I'm sorry the jacket hasn't arrived yet, that must be frustrating with a trip "
    "coming up. I couldn't find the order from your name alone. Could you tell me the "
    "email address you used at checkout, and, if you have it, the order number from "
    "the confirmation message? Then I can see whether the parcel left our warehouse."
)
_SECOND = (
    "Sure. I used {email} when I ordered, and I paid with {card}. I can't find the "
    "confirmation message anywhere, I think I deleted it by accident while cleaning up "
    "my inbox last weekend. If the jacket can't arrive before Thursday, I would rather "
    "cancel the order and get my money back, and buy one in a shop near me instead. If "
    "it is easier to sort this out over the phone, you can call me on {phone} any day "
    "after five in the afternoon, or in the morning before nine. Thanks a lot for "
    "helping, and sorry for the long message! One more thing: the delivery address is "
    "my office, not my home, so please make sure the courier knows that the reception "
    "closes at six. If it has to be left somewhere, the neighbours on the ground floor "
    "are happy to take parcels for us. Does it come with the small repair kit?"
)


def chat_2k_body(entities: bool = True) -> str:
    values = {"email": EMAIL, "card": CARD, "phone": PHONE}
    if not entities:
        values = {k: NEUTRAL[v] for k, v in values.items()}
    messages = [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _FIRST},
        {"role": "assistant", "content": _ANSWER},
        {"role": "user", "content": _SECOND.format(**values)},
    ]
    return json.dumps({"model": "gpt-4o-mini", "max_tokens": 256, "messages": messages})


CHAT_2K_BODY = chat_2k_body()
REDACTED_PER_REQUEST = 3  # what the redaction defaults replace in CHAT_2K_BODY
STREAM_HEADER = "x-bench-stream"  # the fast upstream answers with SSE when it is present
STREAM_BODY = REQUEST_BODY[:-1] + ', "stream": true}'


def _sse_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    chunk = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta else [],
        **extra,
    }
    return f"data: {json.dumps(chunk)}\n\n"


CHAT_STREAM = (
    _sse_chunk({"role": "assistant", "content": ""})
    + "".join(_sse_chunk({"content": w}) for w in ("Hello!", " How", " can", " I", " help?"))
    + _sse_chunk({}, usage={"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16})
    + "data: [DONE]\n\n"
)


# The Tollway a scenario goes through: "base" has no limits and no redaction; the limits
# stacks have LIMIT_RULES on the named quota store; "redaction" has `redaction: {}` (the
# defaults). Each is its own Tollway process behind its own front Envoy.
BASE = "base"
STACKS = (BASE, "limits-redis", "limits-memory")  # those of limits (limits_driver.py)
REDACTION = "redaction"
ALL_STACKS = (*STACKS, REDACTION)
STORE_NAMES = {"limits-redis": "Redis", "limits-memory": "memory"}
# Three rules that run on every request and never deny during a run (the point is their
# cost): requests by key, tokens by tenant, dollars by tenant. The bench key's tenant is
# "bench"; the request reserves about 34 tokens and $0.00001 of gpt-4o-mini.
LIMIT_RULES: tuple[dict[str, Any], ...] = (
    {"name": "bench-rpm", "by": ["key"], "requests": 1_000_000_000, "per": "minute"},
    {"name": "bench-tpm", "by": ["tenant"], "tokens": 1_000_000_000_000, "per": "minute"},
    {"name": "bench-budget", "by": ["tenant"], "budget_usd": "1000000", "per": "month"},
)


@dataclass(frozen=True)
class Scenario:
    name: str
    method: str
    path: str
    body: str | None
    headers: dict[str, str]
    about: str
    stack: str = BASE
    base: str | None = None  # the same request without limits or redaction, to compare

    @property
    def feature(self) -> str | None:
        """What this scenario measures the cost of: "limits", "redaction" or nothing."""
        if self.stack == BASE:
            return None
        return REDACTION if self.stack == REDACTION else "limits"

    def with_limits(self, stack: str) -> Scenario:
        about = f"{self.about}, {len(LIMIT_RULES)} limit rules, {STORE_NAMES[stack]} store"
        name = f"{self.name}+{stack}"
        return Scenario(
            name, self.method, self.path, self.body, self.headers, about, stack, self.name
        )

    def with_redaction(self, name: str) -> Scenario:
        about = f"{self.about}, redaction (the defaults): 3 entities replaced"
        return Scenario(
            name, self.method, self.path, self.body, self.headers, about, REDACTION, self.name
        )


_CHAT = Scenario(
    "chat",
    "POST",
    PATH,
    REQUEST_BODY,
    {"content-type": "application/json"},
    "metered JSON chat completion",
)
_STREAM = Scenario(
    "stream",
    "POST",
    PATH,
    STREAM_BODY,
    {"content-type": "application/json", STREAM_HEADER: "1"},
    "metered SSE chat stream",
)
# The chat with CHAT_2K_BODY: the base to compare redaction with (the same body, so the
# difference is redaction's work, not the larger body's cost in Envoy and metering).
_CHAT_2K = Scenario(
    "chat-2k",
    "POST",
    PATH,
    CHAT_2K_BODY,
    {"content-type": "application/json"},
    f"metered JSON chat completion, a {len(CHAT_2K_BODY)}-byte body of 4 messages",
)
SCENARIOS = {
    s.name: s
    for s in (
        Scenario("auth", "GET", "/v1/models", None, {}, "auth only: 1 message"),
        _CHAT,
        _STREAM,
        *(base.with_limits(stack) for base in (_CHAT, _STREAM) for stack in STACKS[1:]),
        _CHAT_2K,
        _CHAT_2K.with_redaction("chat+redaction"),
    )
}
DEFAULT_SCENARIOS = ("auth", "chat", "stream")
# Targets over the same scenario without the feature, in one run (the issues): added
# Tollway CPU per request (None: no target), and the drop of the ratio to plain Envoy.
TARGETS: dict[str, tuple[float | None, float]] = {
    "limits": (60.0, 0.10),
    REDACTION: (None, 0.15),
}
UPSTREAM_YAML = Path(__file__).with_name("upstream-envoy.yaml")
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
MAX_ERROR_RATIO = 0.01
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"


@dataclass
class Target:
    name: str
    envoy: Proc
    config: Config  # the front door's ports
    tollway: Proc | None = None
    store: Proc | None = None  # the redis-server behind this Tollway's limits

    @property
    def limits(self) -> bool:
        return bool(self.config.limits) and self.tollway is not None

    @property
    def redacts(self) -> bool:
        return self.config.redaction is not None and self.tollway is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.envoy.port}"

    @property
    def admin_port(self) -> int:
        return self.config.envoy.admin_port


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    envoy_cpu_us: float
    tollway_cpu_us: float | None
    extproc_msgs: float | None  # ext_proc messages Envoy sent Tollway, per request
    non2xx: int = 0  # across rounds: summed
    store_cpu_us: float | None = None  # redis-server's CPU per request
    limit_allowed: float | None = None  # limit decisions "allowed" per request (all rules)
    limit_failed_closed: int | None = None  # store failures refused (503), summed
    limit_failed_open: int | None = None  # store failures let through, summed
    redacted: float | None = None  # entities replaced per request


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--rounds", type=int, default=2, help="plain/tollway pairs; median reported")
    p.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s, 1 round")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    p.add_argument(
        "--scenarios",
        nargs="+",
        default=list(DEFAULT_SCENARIOS),
        help=f"space- or comma-separated, of: {', '.join(SCENARIOS)} "
        f"(default: {' '.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument("--ttfb-requests", type=int, default=300, help="stream requests per front")
    args = p.parse_args()
    args.scenarios = list(
        dict.fromkeys(name for text in args.scenarios for name in text.split(",") if name)
    )
    unknown = set(args.scenarios) - SCENARIOS.keys()
    if unknown:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    # A scenario measured against a base is judged against it in the same run only.
    named = list(args.scenarios)
    for name in named:
        base = SCENARIOS[name].base
        if base is not None and base not in args.scenarios:
            print(f"adding {base}, the base of {name}", file=sys.stderr)
            args.scenarios.insert(args.scenarios.index(name), base)
    if args.quick:
        args.duration, args.rounds, args.ttfb_requests = 3, 1, 50
    return args


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def extproc_msgs_sent(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats?filter=ext_proc.stream_msgs_sent$"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(int(line.rpartition(":")[2]) for line in text.splitlines() if ":" in line)


def counter(metrics_port: int, name: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """The counter ``name`` (without _total) by the values of ``labels``, from Tollway's
    /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[tuple(sample.labels[k] for k in labels)] = sample.value
    return found


def limit_decisions(metrics_port: int) -> dict[tuple[str, ...], float]:
    """tollway_limit_decisions_total by (rule, outcome)."""
    return counter(metrics_port, "tollway_limit_decisions", ("rule", "outcome"))


def redactions(metrics_port: int) -> float:
    """Entities replaced in requests, all types (tollway_redactions_total)."""
    found = counter(metrics_port, "tollway_redactions", ("entity", "action", "where"))
    return sum(v for (_, _, where), v in found.items() if where == "request")


def upstream_envoy_config(port: int, admin_port: int) -> dict[str, Any]:
    """The fast upstream (see upstream-envoy.yaml) answering with CHAT_COMPLETION."""
    config: dict[str, Any] = yaml.safe_load(UPSTREAM_YAML.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"]["port_value"] = port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes[0]["direct_response"]["body"]["inline_string"] = CHAT_COMPLETION
    stream = {
        "match": {"prefix": "/", "headers": [{"name": STREAM_HEADER, "present_match": True}]},
        "direct_response": {"status": 200, "body": {"inline_string": CHAT_STREAM}},
        "response_headers_to_add": [
            {"header": {"key": "content-type", "value": "text/event-stream"}}
        ],
    }
    routes.insert(0, stream)
    return config


def plain_envoy_config(config: Config) -> dict[str, Any]:
    """The rendered front door without the ext_proc filter.

    Its cluster goes too, so the plain Envoy does not health-check Tollway; the routes'
    per-filter "disabled" entries for ext_proc stay (Envoy accepts and ignores them).
    """
    rendered = envoyconf.render(config)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = hcm["typed_config"]["http_filters"]
    hcm["typed_config"]["http_filters"] = [f for f in filters if f["name"] != EXT_PROC_FILTER]
    static = rendered["static_resources"]
    static["clusters"] = [c for c in static["clusters"] if c["name"] != envoyconf.EXTPROC_CLUSTER]
    return rendered


def bench_config(
    upstream_port: int, keys_file: Path, stack: str = BASE, redis_url: str | None = None
) -> Config:
    """One upstream `openai` at the fast upstream, no credential; auth on (the default).

    Metrics are served (on a free port) so the limits stacks can show their decisions;
    an idle metrics thread costs nothing per request. The limits stacks add LIMIT_RULES
    and their store: Redis at ``redis_url``, or memory (budgets saved next to the keys);
    the redaction stack adds ``redaction: {}``.
    """
    upstream = {"url": f"http://127.0.0.1:{upstream_port}", "api": "openai", "prefixes": ["/v1/"]}
    settings: dict[str, Any] = {
        "server": {"port": up.free_port(), "drain_delay_s": 0, "drain_timeout_s": 2},
        "metrics": {"enabled": True, "port": up.free_port()},
        "auth": {"keys_file": str(keys_file)},
        "envoy": {"port": up.free_port(), "admin_port": up.free_port(), "concurrency": 1},
        "upstreams": {"openai": upstream},
    }
    if stack == REDACTION:
        settings["redaction"] = {}
    elif stack != BASE:
        settings["limits"] = LIMIT_RULES
    if stack == "limits-redis":
        assert redis_url is not None
        settings["store"] = {"redis": {"url": redis_url}}
    elif stack == "limits-memory":
        settings["store"] = {"budgets_file": str(keys_file.parent / f"budgets-{stack}.json")}
    return Config.model_validate(settings)


def post_status(url: str, key: str | None) -> int:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + PATH, REQUEST_BODY.encode(), headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def start_envoy(name: str, config: dict[str, Any], workdir: Path, procs: list[Proc]) -> Proc:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = up.spawn(up.envoy_command(path, concurrency=1), log=workdir / f"{name}.log")
    procs.append(proc)
    return proc


def start_tollway(name: str, config: Config, workdir: Path, procs: list[Proc]) -> Proc:
    config_file = workdir / f"{name}.yaml"
    up.write_config(config, config_file)
    argv = [sys.executable, "-m", "extproc", "serve", "--config", str(config_file)]
    procs.append(up.spawn(argv, log=workdir / f"{name}.log"))
    return procs[-1]


def redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path, procs: list[Proc]) -> tuple[Proc, str]:
    """A throwaway redis-server on a free loopback port, no persistence; (proc, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: apt-get install -y redis-server")
    port = up.free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(workdir)]
    procs.append(up.spawn(argv, log=workdir / "redis.log"))
    up.wait_until(lambda: redis_answers(port), READY_TIMEOUT_S, "redis-server", procs)
    return procs[-1], f"redis://127.0.0.1:{port}/0"


def with_new_ports(config: Config) -> Config:
    ports = {"port": up.free_port(), "admin_port": up.free_port()}
    return config.model_copy(update={"envoy": config.envoy.model_copy(update=ports)})


def wait_ready(plain: Target, tollways: list[Target], key: str, procs: list[Proc]) -> None:
    """Each Tollway healthy in Envoy's eyes, a 200 through every front, a 401 without a key."""
    for tollway in tollways:
        up.wait_until(
            lambda t=tollway: up.extproc_healthy(t.admin_port),
            READY_TIMEOUT_S,
            f"{tollway.name} health",
            procs,
        )
    for target in (plain, *tollways):
        url = target.url
        ok = f"{target.name}: 200 on POST {PATH}"
        up.wait_until(lambda u=url: post_status(u, key) == 200, READY_TIMEOUT_S, ok, procs)
    for tollway in tollways:
        no_key = post_status(tollway.url, None)
        if no_key != 401:
            raise RuntimeError(
                f"{tollway.name}: auth looks off: POST without a key got {no_key}, expected 401"
            )


def start_stack(
    workdir: Path, procs: list[Proc], stacks: set[str]
) -> tuple[Target, dict[str, Target], str]:
    """Upstream, the plain front, and for each stack a Tollway and its front door (the
    base one always, for the TTFB probe); returns (plain, tollways by stack, key)."""
    upstream_port = up.free_port()
    start_envoy("upstream", upstream_envoy_config(upstream_port, up.free_port()), workdir, procs)
    key, record = keys.generate(name="bench", tenant="bench")
    keys.add(workdir / "keys.yaml", record)
    tollways: dict[str, Target] = {}
    for stack in (s for s in ALL_STACKS if s == BASE or s in stacks):
        store = redis_url = None
        if stack == "limits-redis":
            store, redis_url = start_redis(workdir, procs)
        config = bench_config(upstream_port, workdir / "keys.yaml", stack, redis_url)
        tollway_proc = start_tollway(f"tollway-{stack}", config, workdir, procs)
        front = start_envoy(f"front-{stack}", envoyconf.render(config), workdir, procs)
        name = "envoy+tollway" if stack == BASE else f"tollway+{stack.removeprefix('limits-')}"
        tollways[stack] = Target(name, front, config, tollway_proc, store)
    plain_conf = with_new_ports(tollways[BASE].config)
    plain_proc = start_envoy("front-plain", plain_envoy_config(plain_conf), workdir, procs)
    plain = Target("plain envoy", plain_proc, plain_conf)
    wait_ready(plain, list(tollways.values()), key, procs)
    return plain, tollways, key


def write_lua(workdir: Path, key: str, scenario: Scenario) -> Path:
    script = workdir / f"{scenario.name}.lua"
    lines = [f"wrk.method = {json.dumps(scenario.method)}"]
    if scenario.body is not None:
        lines.append(f"wrk.body = {json.dumps(scenario.body)}")
    for name, value in {**scenario.headers, "authorization": f"Bearer {key}"}.items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    script.write_text("\n".join(lines) + "\n")
    return script


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk output has no {percentile}% latency:\n{text}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(text: str) -> tuple[int, float, float, float, int, int]:
    """(requests, rps, p50_ms, p99_ms, errors, non2xx) from `wrk --latency` output."""
    requests = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.MULTILINE)
    if requests is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    sockets = re.search(r"Socket errors:(.*)", text)
    bad_status = int(non2xx.group(1)) if non2xx else 0
    errors = bad_status
    if sockets:
        errors += sum(int(n) for n in re.findall(r"\d+", sockets.group(1)))
    p50, p99 = _latency_ms(text, "50"), _latency_ms(text, "99")
    return int(requests.group(1)), float(rps.group(1)), p50, p99, errors, bad_status


def run_wrk(url: str, script: Path, duration: int, connections: int) -> str:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    argv += ["-s", str(script), url + SCENARIOS[script.stem].path]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    return done.stdout


def measure(target: Target, script: Path, duration: int, connections: int) -> Sample:
    procs = [p for p in (target.envoy, target.tollway, target.store) if p is not None]
    metrics_port = target.config.metrics.port if target.limits or target.redacts else None
    decisions_before = limit_decisions(metrics_port) if metrics_port else {}
    redacted_before = redactions(metrics_port) if metrics_port else 0.0
    msgs_before = extproc_msgs_sent(target.admin_port)
    before = [cpu_seconds(proc.pid) for proc in procs]
    output = run_wrk(target.url, script, duration, connections)
    used = [cpu_seconds(proc.pid) - start for proc, start in zip(procs, before, strict=True)]
    msgs = extproc_msgs_sent(target.admin_port) - msgs_before
    requests, rps, p50, p99, errors, non2xx = parse_wrk(output)
    if requests == 0 or errors > MAX_ERROR_RATIO * requests:
        raise RuntimeError(f"{target.name}: {errors} errors in {requests} requests:\n{output}")
    per_request = [seconds * 1e6 / requests for seconds in used]
    if target.tollway is None:
        return Sample(rps, p50, p99, requests, per_request[0], None, None, non2xx)
    sample = Sample(
        rps, p50, p99, requests, per_request[0], per_request[1], msgs / requests, non2xx
    )
    if metrics_port is None:
        return sample
    if target.redacts:
        redacted = redactions(metrics_port) - redacted_before
        if redacted < REDACTED_PER_REQUEST * (requests - connections):
            raise RuntimeError(
                f"{target.name}: {redacted:.0f} entities replaced in {requests} requests,"
                f" expected {REDACTED_PER_REQUEST} in each"
            )
        sample.redacted = redacted / requests
    if not target.limits:
        return sample
    after = limit_decisions(metrics_port)
    moved = {k: v - decisions_before.get(k, 0.0) for k, v in after.items()}
    check_decisions(target, moved, requests, connections)
    sample.store_cpu_us = per_request[2] if target.store is not None else None
    sample.limit_allowed = sum(v for (_, outcome), v in moved.items() if outcome == "allowed")
    sample.limit_allowed /= requests
    sample.limit_failed_closed = int(sum(v for (_, o), v in moved.items() if o == "failed_closed"))
    sample.limit_failed_open = int(sum(v for (_, o), v in moved.items() if o == "failed_open"))
    return sample


def check_decisions(
    target: Target, moved: dict[tuple[str, ...], float], requests: int, connections: int
) -> None:
    """Every rule decided (about) every request, and none was limited: the rules ran and
    nothing was denied. A request decided just before the measurement began may finish
    inside it, hence the slack of one request a connection."""
    for rule in target.config.limits:
        allowed = moved.get((rule.name, "allowed"), 0.0)
        if allowed < requests - connections:
            raise RuntimeError(
                f"{target.name}: rule {rule.name} allowed {allowed:.0f} of {requests} requests"
                f" (decisions: {moved})"
            )
        if moved.get((rule.name, "limited"), 0.0):
            raise RuntimeError(f"{target.name}: rule {rule.name} denied requests: {moved}")


def median_sample(samples: list[Sample]) -> Sample:
    """Field by field median across rounds; `requests` is the total."""

    def median(name: str) -> Any:
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return float(statistics.median(values)) if values else None

    def total(name: str) -> Any:
        values = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        return sum(values) if values else None

    merged = {f.name: median(f.name) for f in fields(Sample)}
    totals = ("requests", "non2xx", "limit_failed_closed", "limit_failed_open")
    return Sample(**{**merged, **{name: total(name) for name in totals}})


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()}


def summarize(plain: Sample, tollway: Sample) -> dict[str, Any]:
    return {
        "plain": _rounded(asdict(plain)),
        "tollway": _rounded(asdict(tollway)),
        "ratio_rps": round(tollway.rps / plain.rps, 3),
        "added_p50_ms": round(tollway.p50_ms - plain.p50_ms, 3),
        "added_p99_ms": round(tollway.p99_ms - plain.p99_ms, 3),
    }


def compare(result: dict[str, Any], base: dict[str, Any], feature: str) -> dict[str, Any]:
    """What limits or redaction add over the same scenario without them, in the same run.

    Both send plain Envoy the same request, so their two plain-Envoy runs measure
    one thing; they still differ by 10% here from noise alone. The ratios are
    taken against their mean (so the drop is that of Tollway's own RPS)."""
    added_cpu = result["tollway"]["tollway_cpu_us"] - base["tollway"]["tollway_cpu_us"]
    plain = (result["plain"]["rps"] + base["plain"]["rps"]) / 2
    drop = 1 - (result["tollway"]["rps"] / plain) / (base["tollway"]["rps"] / plain)
    max_cpu, max_drop = TARGETS[feature]
    return {
        "added_tollway_cpu_us": round(added_cpu, 1),
        "ratio_rps_drop": round(drop, 3),
        "within_targets": (max_cpu is None or added_cpu <= max_cpu) and drop <= max_drop,
    }


def targets_text(feature: str) -> tuple[str, str]:
    """The targets of ``feature``: (added CPU, ratio drop), as the tables say them."""
    max_cpu, max_drop = TARGETS[feature]
    return ("none" if max_cpu is None else f"<= {max_cpu:.0f} us/req"), f"{max_drop:.0%}"


ROW = "{:<18}{:>9}{:>9}{:>9}{:>18}{:>20}"
COST_ROW = "{:<24}{:>20}{:>11}{:>11}{:>12}{:>17}"


def print_table(scenario: Scenario, rows: list[tuple[str, Sample]], result: dict[str, Any]) -> None:
    print(f"\n== {scenario.name}: {scenario.method} {scenario.path} ({scenario.about})")
    print(ROW.format("target", "rps", "p50_ms", "p99_ms", "envoy_cpu_us/req", "tollway_cpu_us/req"))
    for name, s in rows:
        tollway = "-" if s.tollway_cpu_us is None else f"{s.tollway_cpu_us:.0f}"
        cells = f"{s.rps:.0f}", f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}", f"{s.envoy_cpu_us:.0f}"
        print(ROW.format(name, *cells, tollway))
    added = (
        f"added p50: {result['added_p50_ms']:.2f} ms   added p99: {result['added_p99_ms']:.2f} ms"
    )
    print(f"ratio rps (tollway/plain): {result['ratio_rps']:.2f}   {added}")
    ext = rows[1][1]
    if ext.extproc_msgs is not None:
        print(f"ext_proc messages per request (Envoy -> Tollway): {ext.extproc_msgs:.2f}")
    if ext.limit_allowed is not None:
        store = (
            ""
            if ext.store_cpu_us is None
            else f"   redis-server cpu: {ext.store_cpu_us:.0f} us/req"
        )
        print(
            f"limit decisions per request: {ext.limit_allowed:.2f} allowed"
            f"   limited: 0   store failures: {ext.limit_failed_closed} closed,"
            f" {ext.limit_failed_open} open"
            f"   non-2xx: {ext.non2xx}{store}"
        )
    if ext.redacted is not None:
        print(f"entities replaced per request: {ext.redacted:.2f}   non-2xx: {ext.non2xx}")
    if "vs_base" in result and scenario.feature is not None:
        vs = result["vs_base"]
        cpu, drop = targets_text(scenario.feature)
        print(
            f"vs {scenario.base} in this run: {vs['added_tollway_cpu_us']:+.0f} us Tollway CPU/req"
            f" (target: {cpu}), ratio rps {-vs['ratio_rps_drop']:+.1%} (target >= -{drop};"
            " both against the mean of their plain-Envoy runs)"
        )


def print_cost_tables(scenarios: list[Scenario], results: dict[str, Any]) -> None:
    for feature in TARGETS:
        print_cost_table(feature, [s for s in scenarios if s.feature == feature], results)


def print_cost_table(feature: str, scenarios: list[Scenario], results: dict[str, Any]) -> None:
    """The rows of ``feature`` next to the rows they are compared with: one table, one run."""
    rows = [s for s in scenarios if s.base is not None and "vs_base" in results[s.name]]
    if not rows:
        return
    print(f"\n== cost of {feature} (difference against the same scenario without it, this run)")
    print("(ratio_drop: against the mean of the two plain-Envoy runs, which send the same request)")
    print(
        COST_ROW.format(
            "scenario",
            "tollway_cpu_us/req",
            "added_us",
            "ratio_rps",
            "ratio_drop",
            "within targets",
        )
    )
    for name in dict.fromkeys(n for s in rows for n in (s.base, s.name)):
        assert name is not None
        result = results[name]
        vs = result.get("vs_base")
        cells = (
            f"{result['tollway']['tollway_cpu_us']:.0f}",
            "-" if vs is None else f"{vs['added_tollway_cpu_us']:+.0f}",
            f"{result['ratio_rps']:.3f}",
            "-" if vs is None else f"{vs['ratio_rps_drop']:.1%}",
            "-" if vs is None else ("yes" if vs["within_targets"] else "NO"),
        )
        print(COST_ROW.format(name, *cells))
    cpu, drop = targets_text(feature)
    print(f"targets: added Tollway CPU: {cpu}, ratio to plain Envoy drops by <= {drop}")


def run_rounds(
    runs: list[tuple[Path, list[Target]]], args: argparse.Namespace
) -> dict[str, list[Sample]]:
    """Warm up, then per round each scenario on each of its targets in turn (plain, then
    its Tollway); medians per pair."""
    for script, targets in runs:
        for target in targets:
            run_wrk(target.url, script, args.warmup, args.connections)
    samples: dict[str, list[list[Sample]]] = {
        script.stem: [[] for _ in targets] for script, targets in runs
    }
    for round_no in range(1, args.rounds + 1):
        for script, targets in runs:
            for target, mine in zip(targets, samples[script.stem], strict=True):
                mine.append(measure(target, script, args.duration, args.connections))
                print(
                    f"round {round_no} {script.stem:<22}{target.name:<16}"
                    f" {mine[-1].rps:8.0f} rps"
                    f"  p50 {mine[-1].p50_ms:.2f} ms  p99 {mine[-1].p99_ms:.2f} ms",
                    file=sys.stderr,
                )
    return {name: [median_sample(mine) for mine in pair] for name, pair in samples.items()}


def first_byte_ms(conn: http.client.HTTPConnection, key: str) -> float:
    """One stream request on a kept-alive connection: ms until the first body byte."""
    scenario = SCENARIOS["stream"]
    headers = {**scenario.headers, "authorization": f"Bearer {key}"}
    start = time.perf_counter()
    conn.request(scenario.method, scenario.path, scenario.body, headers)
    response = conn.getresponse()
    first = response.read1(1)
    elapsed = (time.perf_counter() - start) * 1e3
    response.read()
    if response.status != 200 or not first:
        raise RuntimeError(f"stream probe: status {response.status}")
    return elapsed


def probe_ttfb(targets: list[Target], key: str, count: int) -> dict[str, Any]:
    """Time to first byte of an SSE response, unloaded, requests alternating between fronts."""
    conns = [
        http.client.HTTPConnection("127.0.0.1", t.config.envoy.port, timeout=10) for t in targets
    ]
    times: list[list[float]] = [[] for _ in targets]
    try:
        for i in range(count + 20):
            for conn, mine in zip(conns, times, strict=True):
                elapsed = first_byte_ms(conn, key)
                if i >= 20:  # the first requests warm up connections and caches
                    mine.append(elapsed)
    finally:
        for conn in conns:
            conn.close()

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    result: dict[str, Any] = {
        t.name: {"p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99)}
        for t, v in zip(targets, times, strict=True)
    }
    plain, tollway = (result[t.name] for t in targets)
    result["added_p50_ms"] = round(tollway["p50_ms"] - plain["p50_ms"], 3)
    result["added_p99_ms"] = round(tollway["p99_ms"] - plain["p99_ms"], 3)
    return result


def ensure_wrk() -> bool:
    """Install wrk from Debian's packages when it is missing and we may."""
    if shutil.which("wrk") is not None:
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing wrk (apt-get install wrk)", file=sys.stderr)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False)
    return shutil.which("wrk") is not None


def main() -> int:
    args = parse_args()
    if not ensure_wrk():
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    procs: list[Proc] = []
    scenarios = [SCENARIOS[name] for name in args.scenarios]
    try:
        plain, tollways, key = start_stack(workdir, procs, {s.stack for s in scenarios})
        tollway = tollways[BASE]
        runs = [
            (write_lua(workdir, key, scenario), [plain, tollways[scenario.stack]])
            for scenario in scenarios
        ]
        medians = run_rounds(runs, args)
        ttfb = probe_ttfb([plain, tollway], key, args.ttfb_requests)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: {exc}\n(logs kept in {workdir})", file=sys.stderr)
        return 1
    finally:
        up.stop_all(list(reversed(procs)))
    shutil.rmtree(workdir, ignore_errors=True)
    settings = {"duration_s": args.duration, "connections": args.connections}
    result: dict[str, Any] = {
        "settings": {**settings, "rounds": args.rounds, "cpus": os.cpu_count()},
        "scenarios": {},
    }
    results = result["scenarios"]
    for scenario in scenarios:
        pair = medians[scenario.name]
        summary = results[scenario.name] = summarize(pair[0], pair[1])
        if scenario.base in results and scenario.feature is not None:
            summary["vs_base"] = compare(summary, results[scenario.base], scenario.feature)
        name = tollways[scenario.stack].name
        print_table(scenario, [(plain.name, pair[0]), (name, pair[1])], summary)
    print_cost_tables(scenarios, results)
    result["ttfb_stream"] = ttfb
    print(f"\n== time to first byte of a stream, unloaded ({args.ttfb_requests} requests each)")
    for target in (plain, tollway):
        values = ttfb[target.name]
        print(f"{target.name:<16} p50 {values['p50_ms']:.2f} ms  p99 {values['p99_ms']:.2f} ms")
    print(f"added p50: {ttfb['added_p50_ms']:.2f} ms   added p99: {ttfb['added_p99_ms']:.2f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
