"""In-process Prometheus metrics: names match docs/metrics.md, labels are bounded, no user label."""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import time
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from llmcost_mw.errors import ConfigurationError
from llmcost_mw.events import CostEvent, Status
from llmcost_mw.metrics import (
    CALL_COST_BUCKETS_USD,
    OTHER_LABEL,
    UNKNOWN_LABEL,
    Metrics,
    make_metrics_asgi_app,
)
from llmcost_mw.usage import Usage
from servers import (
    IN_PROCESS_SECTION,
    METRICS_DOC,
    REPO_ROOT,
    documented_metrics,
    require_binary,
    sample_sum,
    scraped_metrics,
)

USAGE = Usage(
    input_tokens=30, cache_write_5m_tokens=200, cache_write_1h_tokens=100, cache_read_tokens=50,
    output_tokens=7,
)


def _event(**overrides) -> CostEvent:
    fields = dict(
        provider="anthropic",
        model="claude-sonnet-4-6",
        usage=USAGE,
        feature="summarize",
        user_id="u-secret-42",
        cost_usd=Decimal("0.012"),
        latency_ms=850.0,
    )
    fields.update(overrides)
    return CostEvent(**fields)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def scrape_of(registry):
    """Build Metrics on the test's registry and return (metrics, scrape function)."""
    metrics = Metrics(registry)
    return metrics, lambda: generate_latest(registry).decode()


def _observe_every_kind(metrics: Metrics) -> None:
    metrics.observe(_event())
    metrics.observe(_event(status=Status.ERROR, usage=Usage(), cost_usd=Decimal("0")))
    metrics.observe(_event(model="claude-unlisted", cost_usd=None, unpriced=True))
    metrics.queued.set(3)


def test_scrape_matches_docs_table(scrape_of):
    metrics, scrape = scrape_of
    _observe_every_kind(metrics)

    assert scraped_metrics(scrape()) == documented_metrics(IN_PROCESS_SECTION)


def test_docs_name_opentelemetry_counterparts():
    text = METRICS_DOC.read_text(encoding="utf-8")
    for name in (
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_creation.input_tokens",
        "gen_ai.provider.name",
        "gen_ai.token.type",
    ):
        assert f"`{name}`" in text, name


def test_counts_one_call(scrape_of):
    metrics, scrape = scrape_of
    metrics.observe(_event())
    text = scrape()

    labels = {"provider": "anthropic", "model": "claude-sonnet-4-6", "feature": "summarize"}
    assert sample_sum(text, "llmcost_cost_usd_total", **labels) == pytest.approx(0.012)
    assert sample_sum(text, "llmcost_tokens_total", token_type="input", **labels) == 30
    assert sample_sum(text, "llmcost_tokens_total", token_type="cache_write", **labels) == 300
    assert sample_sum(text, "llmcost_tokens_total", token_type="cache_read", **labels) == 50
    assert sample_sum(text, "llmcost_tokens_total", token_type="output", **labels) == 7
    assert sample_sum(text, "llmcost_calls_total", status="ok", **labels) == 1
    assert sample_sum(text, "llmcost_call_duration_seconds_sum", **labels) == pytest.approx(0.85)
    assert sample_sum(text, "llmcost_call_cost_usd_bucket", le="0.01", **labels) == 0
    assert sample_sum(text, "llmcost_call_cost_usd_bucket", le="0.025", **labels) == 1


def test_unpriced_call_adds_no_cost(scrape_of):
    metrics, scrape = scrape_of
    metrics.observe(_event(model="claude-unlisted", cost_usd=None, unpriced=True))
    text = scrape()

    assert sample_sum(text, "llmcost_cost_usd_total") == 0
    assert sample_sum(text, "llmcost_call_cost_usd_count") == 0
    assert sample_sum(text, "llmcost_unpriced_calls_total", model="claude-unlisted") == 1
    assert sample_sum(text, "llmcost_calls_total", model="claude-unlisted") == 1


def test_call_cost_buckets_hold_alert_ceiling():
    # deploy/prometheus/rules.yml reads the le="0.5" bucket.
    assert 0.5 in CALL_COST_BUCKETS_USD


def test_no_user_label(scrape_of):
    metrics, scrape = scrape_of
    _observe_every_kind(metrics)
    text = scrape()

    assert "u-secret-42" not in text
    assert "user" not in {label for _type, labels in scraped_metrics(text).values() for label in labels}


def test_feature_label_capped_at_max(registry, caplog):
    metrics = Metrics(registry, max_features=3)
    with caplog.at_level(logging.WARNING, logger="llmcost_mw.metrics"):
        for feature in ("a", "b", "c", "d", "e", "a"):
            metrics.observe(_event(feature=feature))
    text = generate_latest(registry).decode()

    assert {feature: sample_sum(text, "llmcost_calls_total", feature=feature) for feature in "abc"} == {
        "a": 2, "b": 1, "c": 1
    }
    assert sample_sum(text, "llmcost_calls_total", feature=OTHER_LABEL) == 2
    assert sample_sum(text, "llmcost_calls_total", feature="d") == 0
    warnings = [record for record in caplog.records if "feature" in record.getMessage()]
    assert len(warnings) == 1
    assert "'d'" in warnings[0].getMessage()


def test_feature_label_allow_list(registry, caplog):
    metrics = Metrics(registry, allowed_features=["summarize", "chat"])
    with caplog.at_level(logging.WARNING, logger="llmcost_mw.metrics"):
        for feature in ("summarize", "chat", "search", "/admin/{id}", None):
            metrics.observe(_event(feature=feature))
    text = generate_latest(registry).decode()

    assert sample_sum(text, "llmcost_calls_total", feature="summarize") == 1
    assert sample_sum(text, "llmcost_calls_total", feature="chat") == 1
    assert sample_sum(text, "llmcost_calls_total", feature=OTHER_LABEL) == 2
    assert sample_sum(text, "llmcost_calls_total", feature=UNKNOWN_LABEL) == 1
    assert len([record for record in caplog.records if "allowed_features" in record.getMessage()]) == 1


def test_model_label_capped_at_max(registry):
    metrics = Metrics(registry, max_models=2)
    for model in ("m1", "m2", "junk-1", "junk-2"):
        metrics.observe(_event(model=model, cost_usd=None, unpriced=True))
    text = generate_latest(registry).decode()

    assert sample_sum(text, "llmcost_unpriced_calls_total", model=OTHER_LABEL) == 2
    assert sample_sum(text, "llmcost_calls_total", model=OTHER_LABEL) == 2


def test_invalid_max_features_rejected(registry):
    with pytest.raises(ConfigurationError, match="max_features"):
        Metrics(registry, max_features=0)


def test_promtool_accepts_scrape(scrape_of):
    promtool = require_binary("promtool")
    metrics, scrape = scrape_of
    _observe_every_kind(metrics)

    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(), capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


def test_observe_overhead_under_budget(metrics):
    """The hook runs on the caller's thread; observe() must stay well under the 30 µs per-call budget."""
    event = _event()
    metrics.observe(event)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(2_000):
            metrics.observe(event)
        runs.append((time.perf_counter() - started) / 2_000)

    assert statistics.median(runs) < 20e-6, f"median {statistics.median(runs) * 1e6:.1f} µs per observe()"


def test_multiprocess_dir_set_after_import(monkeypatch, tmp_path):
    # In this process prometheus_client was imported without the variable.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    with pytest.raises(ConfigurationError, match="after prometheus_client was imported"):
        make_metrics_asgi_app()


def test_multiprocess_dir_missing(tmp_path):
    missing = tmp_path / "absent"
    code = (
        "from llmcost_mw.metrics import make_metrics_asgi_app\n"
        "from llmcost_mw.errors import ConfigurationError\n"
        "try:\n"
        "    make_metrics_asgi_app()\n"
        "except ConfigurationError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PROMETHEUS_MULTIPROC_DIR": str(missing), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )

    assert result.returncode == 0, result.stderr
    assert "is not a directory" in result.stdout
