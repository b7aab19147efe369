"""The cost report: per feature and per user over 7 days, and daily per feature over 30 days.

The queries are SQLAlchemy Core expressions, so the same report runs on
SQLite and PostgreSQL. Windows are computed from an injected clock in UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .events import utcnow
from .retention import daily_totals, pruned_before
from .store import Store, cost_daily, cost_events

__all__ = ["Report", "Table", "build_report", "format_report"]


@dataclass(frozen=True)
class Table:
    """One table of the report: a title, column names and rows of display values."""

    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True)
class Report:
    generated_at: datetime
    tables: tuple[Table, ...]


def build_report(store: Store, *, clock: Callable[[], datetime] = utcnow, top_users: int = 20) -> Report:
    """Run the three report queries against the store.

    Days whose raw rows were pruned are read from the daily roll-ups. A
    window that starts inside such a day counts that whole day.
    """
    store.ensure_schema()
    now = clock()
    week_ago = now - timedelta(days=7)
    month_ago = now - timedelta(days=30)
    # Raw rows where they still exist; daily roll-ups for pruned days.
    pruned = pruned_before(store)
    raw_start = max(week_ago, pruned) if pruned is not None else week_ago
    rolled_end = pruned.date() if pruned is not None else week_ago.date()
    c = cost_events.c
    d = cost_daily.c

    raw_features = (
        sa.select(
            c.feature,
            sa.func.count(),
            sa.func.sum(sa.case((c.unpriced, 1), else_=0)),
            sa.func.sum(c.cost_usd),
            sa.func.sum(c.prompt_tokens + c.completion_tokens),
        )
        .where(c.ts >= raw_start)
        .group_by(c.feature)
    )
    rolled_features = (
        sa.select(
            d.feature,
            sa.func.sum(d.calls),
            sa.func.sum(d.unpriced_calls),
            sa.func.sum(d.cost_usd),
            sa.func.sum(d.prompt_tokens + d.completion_tokens),
        )
        .where(d.day >= week_ago.date(), d.day < rolled_end)
        .group_by(d.feature)
    )
    raw_users = (
        sa.select(c.user_id, sa.func.count(), sa.func.sum(c.cost_usd)).where(c.ts >= raw_start).group_by(c.user_id)
    )
    rolled_users = (
        sa.select(d.user_id, sa.func.sum(d.calls), sa.func.sum(d.cost_usd))
        .where(d.day >= week_ago.date(), d.day < rolled_end)
        .group_by(d.user_id)
    )

    with store.read() as conn:
        features = _merge(conn.execute(raw_features), conn.execute(rolled_features))
        users = _merge(conn.execute(raw_users), conn.execute(rolled_users))
    daily = daily_totals(store, since=month_ago.date(), until=now.date() + timedelta(days=1))

    feature_rows = sorted(features.items(), key=lambda item: (-item[1][2], _label(item[0])))
    user_rows = sorted(users.items(), key=lambda item: (-item[1][1], _label(item[0])))[:top_users]
    daily_rows = sorted(daily.items(), key=lambda item: (item[0][0], item[1]["cost_usd"]), reverse=True)

    tables = (
        Table(
            "Cost per feature, last 7 days",
            ("feature", "calls", "total USD", "avg USD/call", "avg tokens", "unpriced calls"),
            [
                (
                    _label(feature),
                    calls,
                    _usd(cost, 4),
                    _usd(cost / (calls - unpriced), 4) if calls > unpriced else "-",
                    f"{tokens / calls:.0f}" if calls else "0",
                    unpriced,
                )
                for feature, (calls, unpriced, cost, tokens) in feature_rows
            ],
        ),
        Table(
            f"Top {top_users} users by cost, last 7 days",
            ("user", "calls", "total USD"),
            [(_label(user), calls, _usd(cost, 4)) for user, (calls, cost) in user_rows],
        ),
        Table(
            "Daily cost per feature, last 30 days",
            ("day", "feature", "USD"),
            [
                (day.isoformat(), _label(feature), _usd(totals["cost_usd"], 4))
                for (day, feature), totals in daily_rows
                if day >= month_ago.date()
            ],
        ),
    )
    return Report(generated_at=now, tables=tables)


def _merge(*results: Iterable[Any]) -> dict[Any, list[Any]]:
    """Add up rows of (key, number, number, ...) from several queries by key; NULL counts as 0."""
    merged: dict[Any, list[Any]] = {}
    for result in results:
        for key, *values in result:
            numbers = [value if value is not None else 0 for value in values]
            if key in merged:
                merged[key] = [a + b for a, b in zip(merged[key], numbers, strict=True)]
            else:
                merged[key] = numbers
    return merged


def _label(value: str | None) -> str:
    return value if value is not None else "(none)"


def _usd(value: Any, places: int) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{places}f}"


def format_table(table: Table) -> str:
    """Render a table as aligned plain text; numbers are right-aligned."""
    cells = [tuple(str(value) for value in row) for row in table.rows]
    widths = [len(name) for name in table.columns]
    for row in cells:
        widths = [max(width, len(value)) for width, value in zip(widths, row, strict=True)]
    numeric = [all(_is_number(row[i]) for row in cells) if cells else False for i in range(len(widths))]

    def line(values: Sequence[str]) -> str:
        parts = [
            value.rjust(width) if right else value.ljust(width)
            for value, width, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [table.title, line(table.columns), line(["-" * width for width in widths])]
    out.extend(line(row) for row in cells)
    if not cells:
        out.append("(no calls in this window)")
    return "\n".join(out)


def format_report(report: Report) -> str:
    header = f"LLM cost report, generated {report.generated_at:%Y-%m-%d %H:%M} UTC"
    return "\n\n".join([header, *(format_table(table) for table in report.tables)]) + "\n"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True
