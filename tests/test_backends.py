"""The store, the report and the built-in alert rules behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from llmcost_mw.alerts import Watcher, builtin_rules
from llmcost_mw.events import CostEvent, Status
from llmcost_mw.recorder import Recorder
from llmcost_mw.report import build_report
from llmcost_mw.store import Store, cost_daily_feature, cost_events
from llmcost_mw.usage import Usage

NOW = datetime(2026, 2, 10, 15, 0)
MODEL = "claude-sonnet-4-5-20250929"


def event(
    ts, cost, *, user="u-1", feature="chat", model=MODEL, response_id=None, usage=None, **changes
) -> CostEvent:
    built = CostEvent(
        provider="anthropic",
        model=model,
        usage=usage or Usage(input_tokens=100, cache_read_tokens=40, output_tokens=20),
        ts=ts,
        cost_usd=None if cost is None else Decimal(cost),
        unpriced=cost is None,
        user_id=user,
        feature=feature,
        response_id=response_id,
    )
    for name, value in changes.items():
        setattr(built, name, value)
    return built


def row(ts, cost, **options) -> dict:
    return event(ts, cost, **options).to_row()


def history() -> list[dict]:
    """Rows that make every built-in rule fire at NOW, and fill each table of the report."""
    rows = []
    # 40 days of ordinary traffic, for the 7-day and 30-day report tables.
    for day in range(40):
        for hour in (3, 9, 17):
            ts = NOW - timedelta(days=day + 1) + timedelta(hours=hour - 15, minutes=day)
            rows.append(row(ts, "0.0125", user=f"u-{day % 6}", feature=("chat", "search", None)[day % 3]))
    # user_hourly_spend and request_cost: three calls of $2 in the last hour.
    for minute in (10, 25, 40):
        rows.append(row(NOW - timedelta(minutes=minute), "2.00", user="heavy", response_id=f"msg_h{minute}"))
    # feature_daily_spend: $60 on "search" today, before the last hour.
    for hour in range(1, 13):
        rows.append(row(NOW.replace(hour=hour), "5.00", user=f"s-{hour}", feature="search"))
    # unpriced_model: a model missing from the price table.
    rows.append(row(NOW - timedelta(minutes=5), None, model="mystery-1", user=None))
    # A failed call and an event without attribution.
    failed = row(NOW - timedelta(minutes=3), "0.001", status=Status.ERROR, error_type="APIConnectionError")
    rows.append(failed)
    rows.append(row(NOW - timedelta(minutes=2), "0.002", user=None, feature=None, context_missing=True))
    # request_shape: 20 calls in the last hour, each far larger than the
    # feature's daily roll-ups of the last 7 days (see `shape_baseline`).
    large = Usage(input_tokens=2000, output_tokens=400)
    for minute in range(20):
        ts = NOW - timedelta(minutes=minute + 1)
        rows.append(row(ts, "0.001", user="shape-user", feature="shape", usage=large))
    return rows


def shape_baseline() -> list[dict]:
    """Per-feature daily roll-ups of the "shape" feature: 100 calls a day of 160 tokens each."""
    return [
        {
            "day": (NOW - timedelta(days=days)).date(),
            "provider": "anthropic",
            "model": MODEL,
            "feature": "shape",
            "calls": 100,
            "prompt_tokens": 14_000,
            "completion_tokens": 2_000,
            "cost_usd": 0.1,
        }
        for days in range(1, 8)
    ]


@pytest.fixture
def both_stores(tmp_path, postgres_server):
    stores = {
        "sqlite": Store(f"sqlite:///{tmp_path / 'costs.db'}"),
        "postgresql": Store(postgres_server.create_database()),
    }
    yield stores
    for store in stores.values():
        store.dispose()


# -- the store on each backend ---------------------------------------------------


def test_insert_counts_and_duplicates(backend_url):
    store = Store(backend_url)
    first = row(NOW, "0.01", response_id="msg_1")
    second = row(NOW, "0.02", response_id="msg_2")
    same_response = row(NOW, "0.03", response_id="msg_1")
    without_response = [row(NOW, "0.04"), row(NOW, "0.05")]

    inserted = store.insert_events([first, second])
    again = store.insert_events([first, second])
    by_response = store.insert_events([same_response])
    nulls = store.insert_events(without_response)
    costs = [stored["cost_usd"] for stored in store.fetch_events()]
    store.dispose()

    assert inserted == 2
    assert again == 0
    assert by_response == 0
    assert nulls == 2
    assert costs == [0.01, 0.02, 0.04, 0.05]


def test_insert_missing_keys_stored_null(backend_url):
    store = Store(backend_url)
    partial = {key: value for key, value in row(NOW, "0.01").items() if key not in ("feature", "flags")}

    inserted = store.insert_events([partial])
    stored = store.fetch_events()[0]
    store.dispose()

    assert inserted == 1
    assert stored["feature"] is None
    assert stored["flags"] is None


def every_column_event() -> CostEvent:
    """An event whose every column has a value that no other column has."""
    return CostEvent(
        provider="anthropic",
        model="claude-sonnet-4-5-20250929",
        usage=Usage(
            input_tokens=11,
            cache_write_5m_tokens=13,
            cache_write_1h_tokens=17,
            cache_read_tokens=19,
            output_tokens=23,
            reasoning_tokens=29,
            web_search_requests=31,
            web_fetch_requests=37,
            service_tier="priority",
        ),
        status=Status.ERROR,
        ts=datetime(2026, 2, 10, 14, 59, 58, 654321),
        feature="summarize",
        user_id="u-7",
        request_id="req-41",
        response_id="msg_43",
        request_model="claude-sonnet-4-5",
        error_type="overloaded_error",
        cost_usd=Decimal("0.054399"),
        price_version="2026-01-15",
        price_id="claude-sonnet-4-5",
        latency_ms=812.25,
        context_missing=True,
        flags=frozenset({"long_context"}),
        event_id="e" * 32,
    )


EVERY_COLUMN_STORED = {
    "event_id": "e" * 32,
    "ts": datetime(2026, 2, 10, 14, 59, 58, 654321),
    "provider": "anthropic",
    "model": "claude-sonnet-4-5-20250929",
    "request_model": "claude-sonnet-4-5",
    "feature": "summarize",
    "user_id": "u-7",
    "request_id": "req-41",
    "response_id": "msg_43",
    "status": "error",
    "error_type": "overloaded_error",
    "prompt_tokens": 11 + 13 + 17 + 19,
    "completion_tokens": 23,
    "input_tokens": 11,
    "cache_write_5m_tokens": 13,
    "cache_write_1h_tokens": 17,
    "cache_read_tokens": 19,
    "output_tokens": 23,
    "reasoning_tokens": 29,
    "web_search_requests": 31,
    "web_fetch_requests": 37,
    "cost_usd": 0.054399,
    "unpriced": False,
    "price_version": "2026-01-15",
    "price_id": "claude-sonnet-4-5",
    "service_tier": "priority",
    "latency_ms": 812.25,
    "context_missing": True,
    "flags": "long_context",
}


@pytest.mark.parametrize("path", ["values", "row dict"])
def test_every_column_stored_in_place(backend_url, path):
    store = Store(backend_url)
    item = every_column_event()

    if path == "values":
        inserted = store.insert_values([store.event_values(item)])
    else:
        inserted = store.insert_events([item.to_row()])
    stored = store.fetch_events()[0]
    store.dispose()

    assert inserted == 1
    assert {name: value for name, value in stored.items() if name != "id"} == EVERY_COLUMN_STORED


def test_ts_window_filter(backend_url):
    store = Store(backend_url)
    store.insert_events([row(NOW - timedelta(minutes=minutes), "0.01") for minutes in (1, 59, 61, 24 * 60)])
    since = sa.bindparam("since", NOW - timedelta(hours=1), type_=sa.DateTime)
    query = sa.text("SELECT count(*) FROM cost_events WHERE ts >= :since").bindparams(since)

    with store.read() as conn:
        in_window = conn.execute(query).scalar_one()
    store.dispose()

    assert in_window == 2


def test_same_values_read_back(both_stores, tmp_path):
    events = [
        event(NOW.replace(microsecond=123456), "0.054399", response_id="msg_a"),
        event(NOW, None, model="mystery-1", user=None, feature=None, context_missing=True),
        event(NOW, "0.5", status=Status.INCOMPLETE, flags=frozenset({"long_context", "fast_mode"})),
    ]
    read_back = {}
    for name, store in both_stores.items():
        recorder = Recorder(store, spill_path=tmp_path / f"{name}.spill.jsonl")
        for item in events:
            recorder.record(item)
        assert recorder.flush(timeout_seconds=10)
        recorder.close(timeout_seconds=2)
        read_back[name] = store.fetch_events()

    assert read_back["sqlite"] == read_back["postgresql"]
    assert read_back["sqlite"][0]["ts"] == NOW.replace(microsecond=123456)
    assert read_back["sqlite"][0]["cost_usd"] == 0.054399
    assert read_back["sqlite"][1]["unpriced"] is True
    assert read_back["sqlite"][1]["cost_usd"] is None
    assert read_back["sqlite"][2]["flags"] == "fast_mode,long_context"


# -- report and alerts -----------------------------------------------------------


def test_report_and_alerts_match(both_stores):
    rows = history()
    reports = {}
    alerts = {}
    for name, store in both_stores.items():
        assert store.insert_events(rows) == len(rows)
        with store.write() as conn:
            conn.execute(sa.insert(cost_daily_feature), shape_baseline())
        reports[name] = build_report(store, clock=lambda: NOW)
        watcher = Watcher(store, builtin_rules(), None, clock=lambda: NOW, dry_run=True)
        raised = watcher.run_once()
        alerts[name] = sorted(
            (alert.rule, alert.entity, alert.title, alert.message, alert.count) for alert in raised
        )

    sqlite_tables = reports["sqlite"].tables
    assert [table.rows for table in sqlite_tables] == [table.rows for table in reports["postgresql"].tables]
    assert all(table.rows for table in sqlite_tables)
    assert alerts["sqlite"] == alerts["postgresql"]
    assert {alert[0] for alert in alerts["sqlite"]} == {rule.name for rule in builtin_rules()}


def test_rows_counted_alike(both_stores):
    rows = history()
    counts = {}
    for name, store in both_stores.items():
        store.insert_events(rows)
        with store.read() as conn:
            counts[name] = conn.execute(
                sa.select(cost_events.c.status, sa.func.count(), sa.func.sum(cost_events.c.prompt_tokens))
                .group_by(cost_events.c.status)
                .order_by(cost_events.c.status)
            ).all()

    assert counts["sqlite"] == counts["postgresql"]
