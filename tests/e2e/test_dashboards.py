"""The shipped Grafana dashboard and Prometheus alert rules work on real metrics.

A renamed metric or a dropped label does not break a dashboard loudly: the panel
just goes empty. Here every query is parsed as PromQL and each metric, label
matcher, `by` label and legend is checked against real scrapes of Tollway and
Envoy taken after real traffic; then a real Prometheus (Debian's package)
scrapes the same processes with the shipped alert rules, every query must
return data, and an unpriced model must fire its alert.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import promql_parser
import pytest
import yaml

from extproc import up

from .conftest import Stack, answers, eventually

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


@dataclass
class Parsed:
    selectors: list[promql_parser.VectorSelector] = field(default_factory=list)
    by_labels: set[str] = field(default_factory=set)
    aggregated: bool = False
    problems: list[str] = field(default_factory=list)


def dashboard_queries() -> Iterator[Query]:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
            yield Query(f"panel {panel['title']!r}", target["expr"], legend)
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
    """Requests that touch every panel: priced, unpriced, streamed, denied. How many."""
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
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="tw_wrong").models.list()
    return 4


def test_each_request_opens_one_ext_proc_stream(stack: Stack) -> None:
    """The messages-per-stream panel divides by this counter: it must count every stream."""
    before = stack.metric("tollway_extproc_streams_total")
    sent = send_traffic(stack)
    assert stack.metric("tollway_extproc_streams_total") - before == sent


@pytest.fixture(scope="module")
def metrics(stack: Stack) -> dict[str, dict[str, set[str]]]:
    """Scrapes of Envoy and Tollway after the traffic."""
    send_traffic(stack)
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
    metrics: dict[str, dict[str, set[str]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """Prometheus scraping this stack every second with the shipped rules, after two rounds
    of traffic: the first (from `metrics`) creates the series, the second moves them."""
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
        send_traffic(stack)
        done = sum(v for (name, _), v in stack.scrape().items() if name == "tollway_requests_total")
        # Prometheus has seen all of it, and rate() has two samples of each series or more.
        caught_up = (
            f"sum(tollway_requests_total) >= {done} and on() min(count_over_time(up[1m])) >= 3"
        )
        eventually(lambda: bool(instant(url, caught_up)), timeout=30)
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
