"""The shipped Grafana dashboard and Prometheus alert rules work on real metrics.

A renamed metric or a dropped label does not break a dashboard loudly: the panel
just goes empty. Here every query is parsed as PromQL and each metric, label
matcher, `by` label and legend is checked against real scrapes of Tollway and
Envoy taken after real traffic; then a real Prometheus (Debian's package)
scrapes the same processes with the shipped alert rules, every query must
return data, and an unpriced model must fire its alert.

The stack here has limit rules of each kind on a real Redis store, and the
traffic makes their events happen: requests over a rate limit, a shadow rule's
would-be denials, a budget spent, then Redis stopped (SIGSTOP) so that checks
fail open and closed, the breaker opens and settlements are dropped. Prometheus
sees all of it: the limit and store panels show it, and their alerts go
pending or fire.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import openai
import promql_parser
import pytest
import yaml

from extproc import up
from extproc.config import (
    Config,
    LimitMatch,
    LimitRule,
    PricingConfig,
    RedisConfig,
    StoreConfig,
)
from extproc.kinds import Usage
from extproc.limits.rules import MICRO
from extproc.pricing import cost, load_prices
from extproc.stages.limits import estimate_input_tokens
from tests.redis_server import RedisServer

from .conftest import Stack, answers, eventually, start_stack

pytestmark = pytest.mark.e2e

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana/dashboards/tollway.json"
ALERTS = DEPLOY / "alerts.yml"
# Grafana's variables, replaced by something PromQL accepts.
VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$tenant": ".*", "$model": ".*"}
# Labels Prometheus adds to every target's series; `up` is its own metric.
TARGET_LABELS = {"instance", "job"}
PROMETHEUS_METRICS = {"up"}


@dataclass
class Query:
    where: str
    expr: str
    legend_labels: set[str] = field(default_factory=set)
    row: str = ""  # a panel's row on the dashboard


@dataclass
class Parsed:
    selectors: list[promql_parser.VectorSelector] = field(default_factory=list)
    by_labels: set[str] = field(default_factory=set)
    aggregated: bool = False
    problems: list[str] = field(default_factory=list)


def dashboard_queries() -> Iterator[Query]:
    dashboard = json.loads(DASHBOARD.read_text())
    row = ""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            yield Query(f"panel {panel['title']!r}", target["expr"], legend, row)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
            assert found, variable["definition"]
            selector, label = found.groups()
            yield Query(f"variable {variable['name']}", f"count by ({label}) ({selector})")


def alert_queries() -> Iterator[Query]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            text = json.dumps(rule.get("annotations", {}))
            legend = set(re.findall(r"\$labels\.(\w+)", text))
            yield Query(f"alert {rule['alert']}", rule["expr"], legend)


def parse(expr: str) -> Parsed:
    for variable, value in VARIABLES.items():
        expr = expr.replace(variable, value)
    parsed = Parsed()
    try:
        _walk(promql_parser.parse(expr), parsed)
    except ValueError as error:
        parsed.problems.append(f"not PromQL: {error}")
    return parsed


def _walk(node: object, into: Parsed) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        into.selectors.append(node)
        return
    if isinstance(node, promql_parser.AggregateExpr):
        into.aggregated = True
        if node.modifier is not None:
            into.by_labels.update(node.modifier.labels)
    for child in ("lhs", "rhs", "expr", "vector_selector"):
        if hasattr(node, child):
            _walk(getattr(node, child), into)
    for arg in getattr(node, "args", ()):
        _walk(arg, into)


SAMPLE = re.compile(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label name -> the values seen.

    Names are kept as exposed: Prometheus stores Envoy's counters without a
    `_total` suffix, which prometheus_client's own parser would add.
    """
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    seen: dict[str, dict[str, set[str]]] = {}
    for line in text.splitlines():
        sample = SAMPLE.match(line)
        if sample is None:  # comments, blank lines
            continue
        labels = seen.setdefault(sample[1], {})
        for name, value in LABEL.findall(sample[2] or ""):
            labels.setdefault(name, set()).add(value)
    return seen


def send_traffic(stack: Stack) -> int:
    """Requests that touch every panel: priced, unpriced, streamed, on a tier without
    rates, denied. How many."""
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys["alice"], max_retries=0)
    for model in ("gpt-4o-mini", "my-own-finetune"):
        message = [{"role": "user", "content": "hello"}]
        client.chat.completions.create(model=model, messages=message)  # type: ignore[arg-type]
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
    )
    assert list(stream)
    # Served on flex, a tier the table has no gpt-4o-mini rates for: flagged tokens.
    flex = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], service_tier="flex"
    )
    assert flex.service_tier == "flex"
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="tw_wrong").models.list()
    return 5


# ---- limits on a Redis store ------------------------------------------------------

# The request that spends the budget: the limits stage reserves its prompt (estimated
# from the body) and its max_tokens at the model's price, and that is the whole budget.
BUDGET_BODY = json.dumps(
    {"model": "gpt-4o", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
).encode()
CHAT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
).encode()
# Streamed: metering makes a provider's time-to-first-token series at its first request,
# and one never observed shows NaN on that panel.
MESSAGES_BODY = json.dumps(
    {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": "hello"}],
    }
).encode()
LIMIT_ALERTS = {
    "TollwayBudgetWarning",
    "TollwayBudgetExhausted",
    "TollwayStoreFailing",
    "TollwayStoreBreakerOpen",
    "TollwayLimitsFailingOpen",
    "TollwayLimitsFailingClosed",
    "TollwaySettlementsDropped",
}
LIMIT_ROWS = {"Limits and budgets", "Quota store (Redis)"}


def reservation_usd(body: bytes) -> Decimal:
    """What the limits stage reserves for this request, in USD (whole micro-dollars)."""
    doc = json.loads(body)
    found = load_prices(PricingConfig()).lookup(doc["model"])
    assert found is not None
    usage = Usage(input_tokens=estimate_input_tokens(body), output_tokens=doc["max_tokens"])
    return Decimal(math.ceil(cost(found[1], usage).usd * MICRO)) / MICRO


def with_limits(redis_url: str) -> Callable[[Config], Config]:
    openai_route = LimitMatch(routes=("openai",))
    anthropic_route = LimitMatch(routes=("anthropic",))
    rules = (
        # Fails open (the default for rates): requests pass while Redis is down.
        LimitRule(name="chat-rpm", requests=1000, per="minute", by=("key",), match=openai_route),
        LimitRule(
            name="messages-rpm", requests=2, per="minute", by=("key",), match=anthropic_route
        ),
        LimitRule(
            name="messages-shadow",
            requests=1,
            per="minute",
            by=("key",),
            shadow=True,
            match=anthropic_route,
        ),
        # Fails closed (the default for budgets); one BUDGET_BODY request spends it.
        LimitRule(
            name="gpt4o-usd",
            budget_usd=reservation_usd(BUDGET_BODY),
            per="day",
            by=("tenant",),
            warn_at=0.2,
            match=LimitMatch(models=("gpt-4o",)),
        ),
    )
    store = StoreConfig(redis=RedisConfig(url=redis_url))

    def customize(config: Config) -> Config:
        return config.model_copy(update={"limits": rules, "store": store})

    return customize


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Stack]:
    """This module's own stack: the test stack plus limit rules on a Redis it may stop."""
    s = start_stack(tmp_path_factory.mktemp("limits"), customize=with_limits(redis.url))
    yield s
    redis.resume()  # a paused Redis would hold up the shutdown for the settlement writer
    s.gateway.stop()


def post(stack: Stack, path: str, body: bytes, headers: dict[str, str]) -> int:
    headers = {"content-type": "application/json", **headers}
    return httpx.post(f"{stack.url}{path}", content=body, headers=headers, timeout=10).status_code


def chat(stack: Stack, body: bytes) -> int:
    bearer = {"authorization": f"Bearer {stack.keys['alice']}"}
    return post(stack, "/v1/chat/completions", body, bearer)


def send_limited_traffic(stack: Stack, key: str) -> list[int]:
    """Three requests with this key under a 2-a-minute rule and a shadow 1-a-minute one,
    then two under the tenant's budget, which one request spends. Their statuses."""
    anthropic = {"x-api-key": stack.keys[key], "anthropic-version": "2023-06-01"}
    statuses = [post(stack, "/anthropic/v1/messages", MESSAGES_BODY, anthropic) for _ in range(3)]
    return statuses + [chat(stack, BUDGET_BODY) for _ in range(2)]


def fail_the_store(prometheus: str, redis: RedisServer, stack: Stack) -> None:
    """Redis stops answering (SIGSTOP) and stays stopped: two bursts of requests, a few
    scrapes apart, fail open (chat-rpm) and closed (the budget), the breaker opens, and
    their settlements are dropped when the writer gives up on them (30 s after each
    was queued)."""
    redis.pause()

    def burst() -> None:
        assert [chat(stack, CHAT_BODY) for _ in range(6)] + [chat(stack, BUDGET_BODY)] == [
            *[200] * 6,
            503,
        ]

    burst()
    # Each series born in the first burst is scraped at least 4 times before the second
    # moves it, so their settlements are dropped more than a scrape apart too.
    scraped = 'count_over_time(tollway_limit_decisions_total{outcome="failed_open"}[1m]) >= 4'
    eventually(lambda: instant(prometheus, scraped), timeout=15)
    burst()
    # Both bursts' settlements given up on (each 30 s after it was queued), then seen.
    given_up = lambda: stack.metric("tollway_settlements_dropped_total", reason="failed") >= 12  # noqa: E731
    eventually(given_up, timeout=60)
    dropped = 'sum(tollway_settlements_dropped_total{reason="failed"}) >= 12'
    eventually(lambda: instant(prometheus, dropped), timeout=45)


def test_each_request_opens_one_ext_proc_stream(stack: Stack) -> None:
    """The messages-per-stream panel divides by this counter: it must count every stream."""
    before = stack.metric("tollway_extproc_streams_total")
    sent = send_traffic(stack)
    assert stack.metric("tollway_extproc_streams_total") - before == sent


@pytest.fixture(scope="module")
def metrics(stack: Stack, prometheus: str) -> dict[str, dict[str, set[str]]]:
    """Scrapes of Envoy and Tollway after the traffic and the store outage."""
    config = stack.gateway.config
    return {
        **scrape(f"http://127.0.0.1:{config.envoy.admin_port}/stats/prometheus"),
        **scrape(f"http://127.0.0.1:{config.metrics.port}/metrics"),
    }


def problems(query: Query, seen: dict[str, dict[str, set[str]]]) -> list[str]:
    parsed = parse(query.expr)
    found = list(parsed.problems)
    labels_in_reach = set(TARGET_LABELS)
    for selector in parsed.selectors:
        name = selector.name
        if name in PROMETHEUS_METRICS:
            continue
        if name not in seen:  # unknown, or never seen: then its labels cannot be checked
            found.append(f"no samples of {name}")
            continue
        labels = seen[name]
        labels_in_reach.update(labels)
        for matcher in selector.matchers.matchers:
            if matcher.name not in labels:
                found.append(f"{name} has no label {matcher.name}")
            # Config-derived values (cluster names) must match what Envoy reports.
            elif matcher.name == "envoy_cluster_name" and matcher.value not in labels[matcher.name]:
                found.append(f"{name} has no {matcher.name}={matcher.value!r}")
    found += [f"'by ({label})' matches no label" for label in parsed.by_labels - labels_in_reach]
    kept = parsed.by_labels if parsed.aggregated else labels_in_reach
    found += [
        f"label {label} in a legend is not in the result" for label in query.legend_labels - kept
    ]
    return [f"{query.where}: {problem}" for problem in found]


def test_every_dashboard_query_reads_metrics_and_labels_that_exist(
    metrics: dict[str, dict[str, set[str]]],
) -> None:
    queries = list(dashboard_queries())
    assert len(queries) > 20
    assert [p for q in queries for p in problems(q, metrics)] == []


def test_every_alert_rule_reads_metrics_and_labels_that_exist(
    metrics: dict[str, dict[str, set[str]]],
) -> None:
    queries = list(alert_queries())
    assert queries
    assert [p for q in queries for p in problems(q, metrics)] == []


def test_the_check_catches_a_renamed_metric_and_a_wrong_label(
    metrics: dict[str, dict[str, set[str]]],
) -> None:
    """The two tests above can fail."""
    renamed = Query("p", "sum(rate(tollway_gen_ai_cost_total[5m]))")
    wrong_label = Query("p", "sum by (team) (rate(tollway_gen_ai_cost_usd_total[5m]))", {"team"})
    broken = Query("p", "sum(rate(tollway_requests_total[5m])")
    assert problems(renamed, metrics) == ["p: no samples of tollway_gen_ai_cost_total"]
    assert problems(wrong_label, metrics) == [
        "p: 'by (team)' matches no label",
    ]
    assert problems(broken, metrics)[0].startswith("p: not PromQL")


# ---- in a real Prometheus -------------------------------------------------------


def instant(prometheus: str, expr: str) -> list[Any]:
    """The result of an instant query; an error names the query."""
    for variable, value in {**VARIABLES, "$__range": "10m"}.items():
        expr = expr.replace(variable, value)
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.loads(response.read())["data"]["result"])
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{expr}: {error.read().decode()}") from error


def api(prometheus: str, path: str) -> Any:
    with urllib.request.urlopen(f"{prometheus}/api/v1/{path}", timeout=5) as response:
        return json.loads(response.read())["data"]


@pytest.fixture(scope="module")
def prometheus(
    stack: Stack,
    redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """Prometheus scraping this stack every second with the shipped rules, after two rounds
    of traffic (the first, before it starts, creates the series; the second moves them)
    and the store outage."""
    send_traffic(stack)
    assert send_limited_traffic(stack, "alice") == [200, 200, 429, 200, 429]
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: ./scripts/test installs it (apt-get install prometheus)"
    workdir = tmp_path_factory.mktemp("prometheus")
    config = stack.gateway.config
    targets = {
        "tollway": ("/metrics", config.metrics.port),
        "envoy": ("/stats/prometheus", config.envoy.admin_port),
    }
    settings = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": path,
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
            for job, (path, port) in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(settings))
    port = up.free_port()
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}"]
    argv += [f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"]
    proc = up.spawn(argv, log=workdir / "prometheus.log")
    url = f"http://127.0.0.1:{port}"

    def has(expr: str, at_least: float = 0) -> bool:
        return any(float(sample["value"][1]) >= at_least for sample in instant(url, expr))

    try:
        eventually(lambda: answers(f"{url}/-/ready"), timeout=60)
        eventually(lambda: has("count(up == 1)", len(targets)) and has("tollway_requests_total"))

        def caught_up() -> None:
            """Prometheus has seen all the requests, and rate() has 2 samples of each or more."""
            done = sum(v for (n, _), v in stack.scrape().items() if n == "tollway_requests_total")
            seen = (
                f"sum(tollway_requests_total) >= {done} and on() min(count_over_time(up[1m])) >= 3"
            )
            eventually(lambda: bool(instant(url, seen)), timeout=30)

        send_traffic(stack)
        # Another key (the same tenant): fresh rates, so each provider's latency moves
        # again, and the tenant's budget stays spent.
        assert send_limited_traffic(stack, "restricted") == [200, 200, 429, 429, 429]
        caught_up()
        fail_the_store(url, redis, stack)
        caught_up()
        yield url
    finally:
        up.stop_all([proc])


def firing(prometheus: str) -> set[tuple[str, str]]:
    """(alert name, provider label) of every firing alert."""
    alerts = api(prometheus, "alerts")["alerts"]
    return {
        (a["labels"]["alertname"], a["labels"].get("provider", ""))
        for a in alerts
        if a["state"] == "firing"
    }


def test_every_dashboard_query_returns_data_in_prometheus(prometheus: str) -> None:
    empty = [f"{q.where}: {q.expr}" for q in dashboard_queries() if not instant(prometheus, q.expr)]
    assert empty == []
    # A panel that divides by a counter nothing increments shows NaN or +Inf, not data.
    not_numbers = [
        f"{q.where}: {sample['value'][1]}"
        for q in dashboard_queries()
        for sample in instant(prometheus, q.expr)
        if sample["value"][1] in ("NaN", "+Inf", "-Inf")
    ]
    assert not_numbers == []


def test_the_alert_rules_load_evaluate_and_fire_for_an_unpriced_model(prometheus: str) -> None:
    shipped = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    eventually(lambda: ("TollwayUnpricedModel", "openai") in firing(prometheus), timeout=30)
    rules = [rule for group in api(prometheus, "rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == shipped
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    healthy = {"TollwayNoHealthyReplica", "TollwayReplicaDown", "TollwayExtProcFailures"}
    assert not {name for name, _ in firing(prometheus)} & healthy


def active_alerts(prometheus: str) -> dict[tuple[str, str], str]:
    """(alert name, its rule, scope, reason or instance label) -> state, for pending and firing."""
    return {
        (a["labels"]["alertname"], _subject(a["labels"])): a["state"]
        for a in api(prometheus, "alerts")["alerts"]
    }


def _subject(labels: dict[str, str]) -> str:
    if "rule" in labels:
        return f"{labels['rule']}/{labels['scope']}" if "scope" in labels else labels["rule"]
    return labels.get("reason", labels.get("instance", ""))


def test_the_limit_and_store_alerts_go_pending_or_fire(prometheus: str, stack: Stack) -> None:
    instance = f"127.0.0.1:{stack.gateway.config.metrics.port}"
    expected = {
        ("TollwayBudgetWarning", "gpt4o-usd/acme"),  # what it spent > warn_at 0.2
        ("TollwayBudgetExhausted", "gpt4o-usd"),  # it refuses requests (by rule: the 429s)
        ("TollwayStoreFailing", instance),
        ("TollwayStoreBreakerOpen", instance),
        ("TollwayLimitsFailingOpen", "chat-rpm"),
        ("TollwayLimitsFailingClosed", "gpt4o-usd"),  # the budget fails closed
        ("TollwayLimitsFailingClosed", "chat-rpm"),  # and refuses its requests for all rules
        ("TollwaySettlementsDropped", "failed"),
    }
    try:
        eventually(lambda: expected <= active_alerts(prometheus).keys(), timeout=15)
    except AssertionError:
        raise AssertionError(f"missing: {expected - active_alerts(prometheus).keys()}") from None
    alerts = active_alerts(prometheus)
    limit_alerts = {key for key in alerts if key[0] in LIMIT_ALERTS}
    # messages-rpm denied requests too, but it is not a budget: not "exhausted".
    assert limit_alerts == expected
    assert alerts["TollwaySettlementsDropped", "failed"] == "firing"  # at once: usage is lost
    # The exhausted alert's second half alone: denials count only for budget rules.
    rules = {
        r["alert"]: r["expr"]
        for g in yaml.safe_load(ALERTS.read_text())["groups"]
        for r in g["rules"]
    }
    denying = rules["TollwayBudgetExhausted"].split("or on(rule)")[1]
    assert {s["metric"]["rule"] for s in instant(prometheus, denying)} == {"gpt4o-usd"}


def test_the_limit_and_store_panels_show_the_events(prometheus: str) -> None:
    """Not only series: each limit and store panel shows a value above 0 for what happened."""
    queries = [q for q in dashboard_queries() if q.row in LIMIT_ROWS]
    assert len(queries) == 10
    flat = [
        f"{q.where}: {q.expr}"
        for q in queries
        if not any(float(s["value"][1]) > 0 for s in instant(prometheus, q.expr))
    ]
    assert flat == []


def test_each_limit_and_store_metric_moved_with_its_event(prometheus: str, stack: Stack) -> None:
    samples = stack.scrape()

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    def decisions(rule: str, outcome: str) -> float:
        return value("tollway_limit_decisions_total", rule=rule, outcome=outcome)

    assert decisions("chat-rpm", "allowed") >= 6  # send_traffic: 4 chat requests, twice
    assert decisions("messages-rpm", "allowed") == 4  # 2 a minute, for each of 2 keys
    assert decisions("messages-rpm", "limited") == 2
    assert decisions("messages-shadow", "shadow_limited") == 4  # and denied nothing itself
    assert decisions("messages-shadow", "limited") == 0
    assert decisions("gpt4o-usd", "allowed") == 1
    assert decisions("gpt4o-usd", "limited") == 3
    assert decisions("chat-rpm", "failed_open") == 12  # two bursts of 6 with Redis stopped
    assert decisions("gpt4o-usd", "failed_closed") == 2
    # Reserved whole (1.0), then settled at what the answer cost, as the denials show it.
    assert 0.2 < value("tollway_budget_used_ratio", rule="gpt4o-usd", scope="acme") < 1
    assert value("tollway_budget_warn_ratio", rule="gpt4o-usd") == 0.2
    assert value("tollway_store_latency_seconds_count", op="take") > 0
    assert value("tollway_store_latency_seconds_count", op="settle") > 0
    assert value("tollway_store_errors_total", op="take", reason="timeout") > 0
    assert value("tollway_store_errors_total", op="take", reason="breaker_open") > 0
    errors = [
        v
        for (name, labels), v in samples.items()
        if name == "tollway_store_errors_total" and ("op", "settle") in labels
    ]
    assert sum(errors) > 0  # the writer retried
    assert value("tollway_store_breaker_open") == 1
    assert value("tollway_settlements_dropped_total", reason="failed") >= 12
