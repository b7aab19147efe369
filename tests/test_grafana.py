"""deploy/grafana/llmcost.json queries only metrics that the app exports."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmcost_mw.events import CostEvent, Status
from llmcost_mw.metrics import Metrics
from llmcost_mw.usage import Usage
from servers import IN_PROCESS_SECTION, REPO_ROOT, documented_metrics, promql_metric_names

DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "llmcost.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def expressions(dashboard) -> list[str]:
    found = [node["expr"] for node in _walk(dashboard) if isinstance(node.get("expr"), str)]
    assert found, "the dashboard has no query expressions"
    return found


@pytest.fixture(scope="module")
def exported_sample_names() -> set[str]:
    """Sample names of a real scrape after calls of every kind (ok, error, unpriced)."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    usage = Usage(input_tokens=10, cache_write_5m_tokens=5, cache_read_tokens=3, output_tokens=4)
    for event in (
        CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=usage, feature="chat",
                  cost_usd=Decimal("0.7"), latency_ms=1200),
        CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=Usage(), feature="chat",
                  status=Status.ERROR, cost_usd=Decimal("0")),
        CostEvent(provider="anthropic", model="claude-unlisted", usage=usage, feature="chat", unpriced=True),
    ):
        metrics.observe(event)
    return {
        sample.name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def _family(sample_name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if sample_name.endswith(suffix):
            return sample_name[: -len(suffix)]
    return sample_name


def test_extractor_finds_metric_names():
    quantile = (
        "histogram_quantile(0.95, sum by (le, model) "
        '(rate(a_seconds_bucket{feature=~"$feature"}[$__rate_interval])))'
    )
    assert promql_metric_names(quantile) == {"a_seconds_bucket"}
    assert promql_metric_names('sum(increase(b_total[1d])) - sum(c_total offset 1h) or on (x) d') == {
        "b_total", "c_total", "d"
    }
    assert promql_metric_names("level:metric:rate5m > 50") == {"level:metric:rate5m"}


def test_every_query_names_exported_metric(expressions, exported_sample_names):
    for expression in expressions:
        names = promql_metric_names(expression)
        assert names, f"no metric name found in {expression!r}"
        assert names <= exported_sample_names, f"{expression!r} names {names - exported_sample_names}"


def test_every_query_metric_documented(expressions):
    documented = set(documented_metrics(IN_PROCESS_SECTION))
    for expression in expressions:
        for name in promql_metric_names(expression):
            assert _family(name) in documented or name in documented, f"{name} in {expression!r}"


def test_feature_variable_uses_exported_label(dashboard, exported_sample_names):
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    query = variables["feature"]["query"]["query"]
    match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)

    assert match, query
    assert match.group(1) in exported_sample_names
    assert match.group(2) == "feature"


@pytest.mark.parametrize(
    "family",
    [
        "llmcost_cost_usd_total",
        "llmcost_tokens_total",
        "llmcost_calls_total",
        "llmcost_call_duration_seconds",
        "llmcost_unpriced_calls_total",
        "llmcost_call_cost_usd",
    ],
)
def test_dashboard_shows_metric(expressions, family):
    used = {_family(name) for expression in expressions for name in promql_metric_names(expression)}
    assert family in used


def test_p95_duration_panel(expressions):
    assert any(
        "histogram_quantile(0.95" in expression and "llmcost_call_duration_seconds_bucket" in expression
        for expression in expressions
    )


def test_panels_well_formed(dashboard):
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]

    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["title"], panel["id"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
