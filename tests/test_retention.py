"""`prune`: old raw rows become daily totals that reports still read, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest

from llmcost_mw.cli import main
from llmcost_mw.errors import ConfigurationError
from llmcost_mw.events import CostEvent
from llmcost_mw.report import build_report
from llmcost_mw.retention import daily_totals, prune, pruned_before, refresh_rollups, rolled_up_through
from llmcost_mw.store import Store, cost_daily
from llmcost_mw.usage import Usage

NOW = datetime(2026, 12, 4, 12, 0)


def _event(days_ago: int, hours: int, feature: str, user: str, cost: str | None) -> dict:
    return CostEvent(
        provider="anthropic",
        model="claude-sonnet-4-6",
        usage=Usage(input_tokens=100, cache_read_tokens=50, output_tokens=20),
        cost_usd=Decimal(cost) if cost is not None else None,
        unpriced=cost is None,
        feature=feature,
        user_id=user,
        ts=NOW.replace(hour=0) - timedelta(days=days_ago) + timedelta(hours=hours),
    ).to_row()


@pytest.fixture
def history(backend_url):
    """40 days of rows: two features, two users, one unpriced call a day."""
    store = Store(backend_url)
    rows = []
    for days_ago in range(40):
        rows.append(_event(days_ago, 1, "chat", "u-1", "0.25"))
        rows.append(_event(days_ago, 5, "chat", "u-2", "0.50"))
        rows.append(_event(days_ago, 9, "summarize", "u-1", "1.25"))
        rows.append(_event(days_ago, 10, "summarize", "u-2", None))
    store.insert_events(rows)
    yield store
    store.dispose()


def test_prune_keeps_daily_totals(history):
    window = {"since": date(2026, 10, 1), "until": date(2026, 12, 5)}
    before = daily_totals(history, **window)

    result = prune(history, older_than_days=7, clock=lambda: NOW)
    after = daily_totals(history, **window)

    # Rows span 2026-10-26 to 2026-12-04; the cutoff is 2026-11-27.
    assert result.cutoff == datetime(2026, 11, 27)
    assert result.days == 32
    assert result.rows_deleted == 32 * 4
    assert history.count_events() == 8 * 4
    assert after == before
    assert after[(date(2026, 11, 1), "chat")] == {"calls": 2, "cost_usd": 0.75, "tokens": 340}


def test_prune_groups_by_feature_user_model(history):
    prune(history, older_than_days=30, clock=lambda: NOW)

    with history.read() as conn:
        rows = conn.execute(cost_daily.select().where(cost_daily.c.day == date(2026, 10, 28))).mappings().all()

    assert len(rows) == 4
    unpriced = [row for row in rows if row["feature"] == "summarize" and row["user_id"] == "u-2"]
    assert unpriced[0]["unpriced_calls"] == 1
    assert unpriced[0]["cost_usd"] is None
    assert sum(row["cache_read_tokens"] for row in rows) == 200


def test_prune_twice_changes_nothing(history):
    prune(history, older_than_days=7, clock=lambda: NOW)
    totals = daily_totals(history, since=date(2026, 10, 1), until=date(2026, 12, 5))

    second = prune(history, older_than_days=7, clock=lambda: NOW)

    assert pruned_before(history) == datetime(2026, 11, 27)

    assert second.rows_deleted == 0
    assert daily_totals(history, since=date(2026, 10, 1), until=date(2026, 12, 5)) == totals


def test_report_reads_pruned_days(history):
    before = build_report(history, clock=lambda: NOW)

    prune(history, older_than_days=3, clock=lambda: NOW)
    after = build_report(history, clock=lambda: NOW)

    daily_before = {row[:2]: row[2] for row in before.tables[2].rows}
    daily_after = {row[:2]: row[2] for row in after.tables[2].rows}
    assert daily_after == daily_before
    assert len(daily_after) == 31 * 2
    # The 7-day tables count the whole first day of the window once it is rolled up.
    users_after = dict((row[0], row[2]) for row in after.tables[1].rows)
    assert users_after == {"u-2": "4.0000", "u-1": "12.0000"}


@pytest.mark.parametrize("days", [0, -3, 1.5], ids=["zero", "negative", "fraction"])
def test_prune_rejects_bad_days(history, days):
    with pytest.raises(ConfigurationError, match="older-than"):
        prune(history, older_than_days=days, clock=lambda: NOW)


def test_prune_command(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'costs.db'}"
    store = Store(url)
    store.insert_events([_event(400, 1, "chat", "u-1", "0.10"), _event(0, 1, "chat", "u-1", "0.10")])

    code = main(["prune", "--database-url", url, "--older-than", "30"])

    assert code == 0
    assert "deleted 1 rows from 1 days" in capsys.readouterr().out
    assert store.count_events() == 1


def test_rollups_cover_complete_days_only(history):
    days = refresh_rollups(history, clock=lambda: NOW)

    assert days == 39
    assert rolled_up_through(history) == date(2026, 12, 3)
    assert refresh_rollups(history, clock=lambda: NOW) == 0
    totals = daily_totals(history, since=date(2026, 12, 3), until=date(2026, 12, 5))
    assert totals[(date(2026, 12, 4), "chat")]["calls"] == 2
    assert totals[(date(2026, 12, 3), "chat")]["calls"] == 2


def test_late_rows_join_their_rolled_day(history):
    refresh_rollups(history, clock=lambda: NOW)
    window = {"since": date(2026, 11, 1), "until": date(2026, 11, 2)}
    before = daily_totals(history, **window)[(date(2026, 11, 1), "chat")]

    # A spill file replayed a week later brings a row for a rolled-up day.
    history.insert_events([_event(33, 3, "chat", "u-9", "2.00")])
    refresh_rollups(history, clock=lambda: NOW)
    after = daily_totals(history, **window)[(date(2026, 11, 1), "chat")]

    assert after["calls"] == before["calls"] + 1
    assert after["cost_usd"] == pytest.approx(before["cost_usd"] + 2.0)


def test_late_rows_survive_prune(history):
    prune(history, older_than_days=7, clock=lambda: NOW)
    history.insert_events([_event(20, 3, "chat", "u-9", "2.00")])

    prune(history, older_than_days=7, clock=lambda: NOW)
    totals = daily_totals(history, since=date(2026, 11, 14), until=date(2026, 11, 15))

    assert totals[(date(2026, 11, 14), "chat")] == {"calls": 3, "cost_usd": 2.75, "tokens": 510}
    assert history.count_events() == 8 * 4
