"""Retention: roll old raw rows up into daily totals, then delete them.

`prune()` works one UTC day at a time, each in its own transaction: the day's
rows are summed per provider, model, feature and user into `cost_daily`, and
deleted in the same transaction, so a crash leaves either both or neither.
`daily_totals()` reads the days of a window from both tables, so reports and
the p95 baseline see pruned days too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .errors import ConfigurationError
from .events import utcnow
from .store import Store, cost_daily, cost_events

__all__ = ["PruneResult", "daily_totals", "prune"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    days: int
    rows_deleted: int
    groups_written: int
    cutoff: datetime


def _day_of(store: Store) -> Any:
    # SQLite keeps `ts` as text, where CAST(... AS DATE) would keep only the
    # year; date() gives the YYYY-MM-DD text that the Date type stores.
    if store.dialect == "sqlite":
        return sa.func.date(cost_events.c.ts)
    return sa.cast(cost_events.c.ts, sa.Date)


def _rollup_select(store: Store, start: datetime, end: datetime) -> Any:
    c = cost_events.c
    return (
        sa.select(
            _day_of(store).label("day"),
            c.provider,
            c.model,
            c.feature,
            c.user_id,
            sa.func.count().label("calls"),
            sa.func.sum(sa.case((c.status == "error", 1), else_=0)).label("error_calls"),
            sa.func.sum(sa.case((c.unpriced, 1), else_=0)).label("unpriced_calls"),
            sa.func.sum(c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(c.completion_tokens).label("completion_tokens"),
            sa.func.sum(c.input_tokens).label("input_tokens"),
            sa.func.sum(c.cache_write_5m_tokens + c.cache_write_1h_tokens).label("cache_write_tokens"),
            sa.func.sum(c.cache_read_tokens).label("cache_read_tokens"),
            sa.func.sum(c.output_tokens).label("output_tokens"),
            sa.func.sum(c.cost_usd).label("cost_usd"),
            sa.func.sum(c.latency_ms).label("latency_ms_sum"),
        )
        .where(c.ts >= start, c.ts < end)
        .group_by(_day_of(store), c.provider, c.model, c.feature, c.user_id)
    )


def prune(store: Store, *, older_than_days: int, clock: Callable[[], datetime] = utcnow) -> PruneResult:
    """Roll up and delete raw rows from UTC days that ended more than `older_than_days` days ago."""
    if not isinstance(older_than_days, int) or older_than_days < 1:
        raise ConfigurationError(
            f"invalid --older-than {older_than_days!r}: give a whole number of days, 1 or more"
        )
    store.ensure_schema()
    today = clock().replace(hour=0, minute=0, second=0, microsecond=0)
    cutoff = today - timedelta(days=older_than_days)
    columns = [column.name for column in cost_daily.columns if column.name != "id"]
    days = deleted = groups = 0
    while True:
        with store.read() as conn:
            oldest = conn.execute(
                sa.select(sa.func.min(cost_events.c.ts)).where(cost_events.c.ts < cutoff)
            ).scalar()
        if oldest is None:
            break
        if isinstance(oldest, str):
            oldest = datetime.fromisoformat(oldest)
        day_start = oldest.replace(hour=0, minute=0, second=0, microsecond=0)
        day_end = min(day_start + timedelta(days=1), cutoff)
        with store.write() as conn:
            inserted = conn.execute(
                sa.insert(cost_daily).from_select(columns, _rollup_select(store, day_start, day_end))
            )
            removed = conn.execute(
                sa.delete(cost_events).where(cost_events.c.ts >= day_start, cost_events.c.ts < day_end)
            )
        groups += max(inserted.rowcount or 0, 0)
        deleted += max(removed.rowcount or 0, 0)
        days += 1
    logger.info(
        "pruned %d raw rows from %d days before %s into %d daily totals", deleted, days, cutoff.date(), groups
    )
    return PruneResult(days=days, rows_deleted=deleted, groups_written=groups, cutoff=cutoff)


def daily_totals(
    store: Store, *, since: date, until: date, group_by: str = "feature"
) -> dict[tuple[date, str | None], dict[str, float]]:
    """Sum calls, cost and tokens per day and feature (or user) over [since, until), raw and rolled-up rows alike."""
    if group_by not in ("feature", "user_id"):
        raise ConfigurationError(f"invalid group_by {group_by!r}: use 'feature' or 'user_id'")
    start = datetime.combine(since, datetime.min.time())
    end = datetime.combine(until, datetime.min.time())
    raw = _rollup_select(store, start, end).subquery()
    raw_query = sa.select(
        raw.c.day, raw.c[group_by], sa.func.sum(raw.c.calls), sa.func.sum(raw.c.cost_usd),
        sa.func.sum(raw.c.prompt_tokens + raw.c.completion_tokens),
    ).group_by(raw.c.day, raw.c[group_by])
    d = cost_daily.c
    rolled_query = (
        sa.select(d.day, d[group_by], sa.func.sum(d.calls), sa.func.sum(d.cost_usd),
                  sa.func.sum(d.prompt_tokens + d.completion_tokens))
        .where(d.day >= since, d.day < until)
        .group_by(d.day, d[group_by])
    )
    totals: dict[tuple[date, str | None], dict[str, float]] = {}
    with store.read() as conn:
        for query in (raw_query, rolled_query):
            for day, key, calls, cost, tokens in conn.execute(query):
                if isinstance(day, str):
                    day = date.fromisoformat(day)
                entry = totals.setdefault((day, key), {"calls": 0, "cost_usd": 0.0, "tokens": 0})
                entry["calls"] += int(calls or 0)
                entry["cost_usd"] += float(cost or 0.0)
                entry["tokens"] += int(tokens or 0)
    return totals
