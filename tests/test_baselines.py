"""Rules that compare a feature with its own history: the daily p95 baseline and the request shape.

Both read the daily roll-ups that the watcher refreshes at the start of each
pass. Runs on SQLite and PostgreSQL with an injected clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest

from llmcost_mw.alerts import Watcher, builtin_rules
from llmcost_mw.alerts.baseline import percentile
from llmcost_mw.events import CostEvent
from llmcost_mw.retention import prune
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

NOW = datetime(2026, 12, 4, 18, 0)
TODAY = NOW.replace(hour=0)


def _row(ts: datetime, cost: str, *, feature: str = "summarize", tokens: int = 1000) -> dict:
    return CostEvent(
        provider="anthropic",
        model="claude-sonnet-4-6",
        usage=Usage(input_tokens=tokens - 100, output_tokens=100),
        cost_usd=Decimal(cost),
        feature=feature,
        user_id="u-1",
        ts=ts,
    ).to_row()


def _history(daily_usd: list[str], *, feature: str = "summarize") -> list[dict]:
    """One row per past day, oldest first, ending yesterday."""
    days = len(daily_usd)
    return [
        _row(TODAY - timedelta(days=days - n) + timedelta(hours=12), cost, feature=feature)
        for n, cost in enumerate(daily_usd)
    ]


def _alerts(store: Store, rule: str, *, now: datetime = NOW) -> list:
    rules = [item for item in builtin_rules() if item.name == rule]
    return Watcher(store, rules, None, clock=lambda: now, dry_run=True).run_once()


@pytest.fixture
def store(backend_url):
    store = Store(backend_url)
    yield store
    store.dispose()


@pytest.mark.parametrize(
    ("values", "expected"),
    [([30.0] * 7, 30.0), ([10, 20, 30, 40, 50, 60, 70], 67.0), ([0, 0, 0, 0, 0, 0, 100], 70.0), ([5.0], 5.0)],
    ids=["steady", "rising", "one-spike", "single"],
)
def test_percentile_interpolates(values, expected):
    assert percentile(values, 0.95) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("today_usd", "fires"),
    [("44.99", False), ("45.00", False), ("45.01", True)],
    ids=["under", "at", "over"],
)
def test_baseline_limit_boundary(store, today_usd, fires):
    # 35 days at $30: the p95 is $30, so the limit is 1.5 x 30 = $45.
    store.insert_events(_history(["30.00"] * 35) + [_row(TODAY + timedelta(hours=1), today_usd)])

    alerts = _alerts(store, "feature_daily_spend")

    assert bool(alerts) is fires
    if fires:
        assert "above its $45.00 daily limit" in alerts[0].message


def test_baseline_uses_last_seven_days(store):
    # Old days are cheap; the last 7 days rise from 10 to 70 (p95 67, limit 100.50).
    daily = ["1.00"] * 30 + ["10", "20", "30", "40", "50", "60", "70"]
    store.insert_events(_history(daily) + [_row(TODAY + timedelta(hours=1), "100.50")])
    assert _alerts(store, "feature_daily_spend") == []

    store.insert_events([_row(TODAY + timedelta(hours=2), "0.02")])
    alerts = _alerts(store, "feature_daily_spend", now=NOW + timedelta(minutes=5))

    assert len(alerts) == 1
    assert "$100.52" in alerts[0].title


@pytest.mark.parametrize(
    ("today_usd", "fires"),
    [("49.99", False), ("50.00", False), ("50.01", True)],
    ids=["under", "at", "over"],
)
def test_young_feature_uses_ceiling(store, today_usd, fires):
    # 29 days of history: not enough for a baseline, so the $50 ceiling applies.
    store.insert_events(_history(["30.00"] * 29) + [_row(TODAY + timedelta(hours=1), today_usd)])

    assert bool(_alerts(store, "feature_daily_spend")) is fires


def test_steady_spend_never_fires(store):
    rows = _history(["30.00"] * 40)
    store.insert_events(rows)

    for day in range(1, 6):
        now = TODAY + timedelta(days=day, hours=23)
        store.insert_events([_row(TODAY + timedelta(days=day, hours=12), "30.00")])
        assert _alerts(store, "feature_daily_spend", now=now) == []


def test_baseline_survives_prune(store):
    store.insert_events(_history(["30.00"] * 35) + [_row(TODAY + timedelta(hours=1), "45.01")])
    prune(store, older_than_days=2, clock=lambda: NOW)

    alerts = _alerts(store, "feature_daily_spend")

    assert len(alerts) == 1
    assert store.count_events() < 5


def _shape_rows(calls: int, tokens: int, *, feature: str = "chat") -> list[dict]:
    return [
        _row(NOW - timedelta(minutes=50) + timedelta(seconds=n), "0.01", feature=feature, tokens=tokens)
        for n in range(calls)
    ]


def _week_of_calls(tokens: int = 1000, *, feature: str = "chat") -> list[dict]:
    return [
        _row(TODAY - timedelta(days=day) + timedelta(hours=hour), "0.01", feature=feature, tokens=tokens)
        for day in range(1, 8)
        for hour in range(0, 24, 4)
    ]


@pytest.mark.parametrize(
    ("tokens", "fires"),
    [(2999, False), (3000, False), (3001, True)],
    ids=["under", "at", "over"],
)
def test_request_shape_boundary(store, tokens, fires):
    store.insert_events(_week_of_calls(1000) + _shape_rows(20, tokens))

    alerts = _alerts(store, "request_shape")

    assert bool(alerts) is fires
    if fires:
        assert "against 1000 over the last 7 days" in alerts[0].message


def test_request_shape_needs_min_calls(store):
    store.insert_events(_week_of_calls(1000) + _shape_rows(19, 50_000))

    assert _alerts(store, "request_shape") == []


def test_request_shape_ignores_new_feature(store):
    store.insert_events(_shape_rows(50, 50_000, feature="brand-new"))

    assert _alerts(store, "request_shape") == []
