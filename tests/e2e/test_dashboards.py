"""The shipped Grafana dashboard and Prometheus alert rules query metrics that exist.

A renamed metric or a dropped label does not break a dashboard loudly: the panel
just goes empty. Here every query is parsed as PromQL and each metric, label
matcher, `by` label and legend is checked against real scrapes of Tollway and
Envoy taken after real traffic.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openai
import promql_parser
import pytest
import yaml

from .conftest import Stack

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


@pytest.fixture(scope="module")
def metrics(stack: Stack) -> dict[str, dict[str, set[str]]]:
    """Both scrapes after traffic that touches every panel: priced, unpriced, streamed, denied."""
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
