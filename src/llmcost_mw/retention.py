"""Daily roll-ups of raw rows, and retention of raw rows.

`refresh_rollups()` sums each complete UTC day per provider, model, feature
and user into `cost_daily` once the day is over. The watcher runs it on
every pass, which costs one day of rows once a day plus the rows added since
the previous pass. Two values in `llmcost_meta` track it:

- `rollup_through`: the last day rolled up. Readers take days up to it from
  `cost_daily` and later days from the raw rows.
- `rollup_max_id`: the highest row id seen by the last roll-up. A row that
  arrives later for a rolled-up day (a replayed spill file, a delayed
  writer) has a higher id, and the next roll-up adds it to that day.

`prune()` rolls up, then deletes raw rows of days that ended more than N
days ago. Reports and the p95 baseline keep reading those days from the
roll-ups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .errors import ConfigurationError
from .events import utcnow
from .store import Store, cost_daily, cost_daily_feature, cost_events, meta

__all__ = ["PruneResult", "daily_totals", "prune", "pruned_before", "refresh_rollups", "rolled_up_through"]

logger = logging.getLogger(__name__)

_THROUGH = "rollup_through"
_MAX_ID = "rollup_max_id"
_PRUNED_BEFORE = "pruned_before"

# A century: larger values would reach before year 1 and overflow datetime.
MAX_RETENTION_DAYS = 36_500


@dataclass(frozen=True)
class PruneResult:
    days: int
    rows_deleted: int
    cutoff: datetime


def _day_of(store: Store) -> Any:
    # SQLite keeps `ts` as text, where CAST(... AS DATE) would keep only the
    # year; date() gives the YYYY-MM-DD text that the Date type stores.
    if store.dialect == "sqlite":
        return sa.func.date(cost_events.c.ts)
    return sa.cast(cost_events.c.ts, sa.Date)


def _rollup_select(store: Store, *where: Any, per_user: bool = True) -> Any:
    c = cost_events.c
    groups = [_day_of(store), c.provider, c.model, c.feature]
    if per_user:
        groups.append(c.user_id)
    return (
        sa.select(
            groups[0].label("day"),
            *groups[1:],
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
        .where(*where)
        .group_by(*groups)
    )


def _insert_rollups(conn: Connection, store: Store, *where: Any) -> None:
    """Add the rows that match `where` to both daily roll-up tables."""
    for table, per_user in ((cost_daily, True), (cost_daily_feature, False)):
        columns = [column.name for column in table.columns if column.name != "id"]
        conn.execute(sa.insert(table).from_select(columns, _rollup_select(store, *where, per_user=per_user)))


def _start_of(day: date) -> datetime:
    return datetime.combine(day, time.min)


def _read_meta(conn: Connection, key: str) -> str | None:
    return conn.execute(sa.select(meta.c.value).where(meta.c.key == key)).scalar()


def _write_meta(conn: Connection, key: str, value: str) -> None:
    updated = conn.execute(sa.update(meta).where(meta.c.key == key).values(value=value))
    if not updated.rowcount:
        conn.execute(sa.insert(meta).values(key=key, value=value))


def rolled_up_through(store: Store) -> date | None:
    """Return the last day whose rows are in `cost_daily`, or None before the first roll-up."""
    store.ensure_schema()
    with store.read() as conn:
        value = _read_meta(conn, _THROUGH)
    return date.fromisoformat(value) if value else None


def pruned_before(store: Store) -> datetime | None:
    """Return the start of the first day that still has its raw rows, or None if nothing was pruned."""
    store.ensure_schema()
    with store.read() as conn:
        value = _read_meta(conn, _PRUNED_BEFORE)
    return datetime.fromisoformat(value) if value else None


def refresh_rollups(store: Store, *, clock: Callable[[], datetime] = utcnow, through: date | None = None) -> int:
    """Roll up every complete day not yet in `cost_daily`, and late rows of days already there.

    `through` limits the roll-up to days up to and including it (never past
    yesterday). Returns the number of days rolled up. Each day is its own
    transaction.
    """
    store.ensure_schema()
    yesterday = clock().date() - timedelta(days=1)
    last_day = min(through, yesterday) if through is not None else yesterday
    c = cost_events.c
    days = 0

    with store.write() as conn:
        value = _read_meta(conn, _THROUGH)
        done_through = date.fromisoformat(value) if value else None
        max_id = int(_read_meta(conn, _MAX_ID) or 0)
        newest_id = conn.execute(sa.select(sa.func.max(c.id))).scalar() or 0
        if done_through is not None and newest_id > max_id:
            # Rows that arrived after their day was rolled up.
            _insert_rollups(
                conn, store, c.id > max_id, c.id <= newest_id, c.ts < _start_of(done_through) + timedelta(days=1)
            )
        if done_through is None:
            oldest = conn.execute(sa.select(sa.func.min(c.ts))).scalar()
            if oldest is None:
                return 0
            if isinstance(oldest, str):
                oldest = datetime.fromisoformat(oldest)
            done_through = oldest.date() - timedelta(days=1)
            _write_meta(conn, _THROUGH, done_through.isoformat())
        _write_meta(conn, _MAX_ID, str(newest_id))

    day = done_through + timedelta(days=1)
    while day <= last_day:
        with store.write() as conn:
            start = _start_of(day)
            # Only rows up to the id mark: later ones are picked up as late rows.
            current_max = int(_read_meta(conn, _MAX_ID) or 0)
            _insert_rollups(conn, store, c.ts >= start, c.ts < start + timedelta(days=1), c.id <= current_max)
            _write_meta(conn, _THROUGH, day.isoformat())
        days += 1
        day += timedelta(days=1)
    if days:
        logger.info("rolled up %d days of cost rows through %s", days, last_day)
    return days


def prune(store: Store, *, older_than_days: int, clock: Callable[[], datetime] = utcnow) -> PruneResult:
    """Delete raw rows of UTC days that ended more than `older_than_days` days ago, after rolling them up."""
    if (
        isinstance(older_than_days, bool)
        or not isinstance(older_than_days, int)
        or not 1 <= older_than_days <= MAX_RETENTION_DAYS
    ):
        raise ConfigurationError(
            f"invalid --older-than {older_than_days!r}: give a whole number of days from 1 to {MAX_RETENTION_DAYS}"
        )
    today = _start_of(clock().date())
    cutoff = today - timedelta(days=older_than_days)
    refresh_rollups(store, clock=clock, through=cutoff.date() - timedelta(days=1))
    through = rolled_up_through(store)
    if through is None:
        return PruneResult(days=0, rows_deleted=0, cutoff=cutoff)
    # Never delete a row that is not in the roll-ups yet.
    cutoff = min(cutoff, _start_of(through) + timedelta(days=1))

    c = cost_events.c
    days = deleted = 0
    while True:
        with store.read() as conn:
            oldest = conn.execute(sa.select(sa.func.min(c.ts)).where(c.ts < cutoff)).scalar()
        if oldest is None:
            break
        if isinstance(oldest, str):
            oldest = datetime.fromisoformat(oldest)
        day_start = _start_of(oldest.date())
        day_end = min(day_start + timedelta(days=1), cutoff)
        # Late rows of this day are rolled up first, so none is lost.
        refresh_rollups(store, clock=clock, through=through)
        with store.write() as conn:
            max_id = int(_read_meta(conn, _MAX_ID) or 0)
            removed = conn.execute(sa.delete(cost_events).where(c.ts >= day_start, c.ts < day_end, c.id <= max_id))
        deleted += max(removed.rowcount or 0, 0)
        days += 1
        if not removed.rowcount:
            break
    with store.write() as conn:
        previous = _read_meta(conn, _PRUNED_BEFORE)
        if previous is None or datetime.fromisoformat(previous) < cutoff:
            _write_meta(conn, _PRUNED_BEFORE, cutoff.isoformat(sep=" "))
    logger.info("pruned %d raw rows from %d days before %s", deleted, days, cutoff.date())
    return PruneResult(days=days, rows_deleted=deleted, cutoff=cutoff)


def daily_totals(
    store: Store, *, since: date, until: date, group_by: str = "feature"
) -> dict[tuple[date, str | None], dict[str, float]]:
    """Sum calls, cost and tokens per day and feature (or user) over [since, until).

    Days up to the last roll-up come from `cost_daily`, later days from the
    raw rows, so each row is counted once whether or not it was pruned.
    """
    if group_by not in ("feature", "user_id"):
        raise ConfigurationError(f"invalid group_by {group_by!r}: use 'feature' or 'user_id'")
    through = rolled_up_through(store)
    raw_since = max(since, through + timedelta(days=1)) if through is not None else since
    raw = _rollup_select(store, cost_events.c.ts >= _start_of(raw_since), cost_events.c.ts < _start_of(until))
    raw = raw.subquery()
    raw_query = sa.select(
        raw.c.day,
        raw.c[group_by],
        sa.func.sum(raw.c.calls),
        sa.func.sum(raw.c.cost_usd),
        sa.func.sum(raw.c.prompt_tokens + raw.c.completion_tokens),
    ).group_by(raw.c.day, raw.c[group_by])
    # Per-feature totals come from the smaller table without users.
    d = cost_daily_feature.c if group_by == "feature" else cost_daily.c
    rolled_until = min(until, through + timedelta(days=1)) if through is not None else since
    rolled_query = (
        sa.select(
            d.day,
            d[group_by],
            sa.func.sum(d.calls),
            sa.func.sum(d.cost_usd),
            sa.func.sum(d.prompt_tokens + d.completion_tokens),
        )
        .where(d.day >= since, d.day < rolled_until)
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
