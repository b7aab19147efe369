"""The cost report: per feature and per user over 7 days, and daily per feature over 30 days.

The queries are SQLAlchemy Core expressions, so the same report runs on
SQLite and PostgreSQL. Windows are computed from an injected clock in UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .events import utcnow
from .store import Store, cost_events

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
    """Run the three report queries against the store."""
    store.ensure_schema()
    now = clock()
    week_ago = now - timedelta(days=7)
    month_ago = now - timedelta(days=30)
    c = cost_events.c
    total_usd = sa.func.coalesce(sa.func.sum(c.cost_usd), 0.0)

    per_feature = (
        sa.select(
            c.feature,
            sa.func.count().label("calls"),
            total_usd.label("total_usd"),
            sa.func.avg(c.cost_usd).label("avg_call_usd"),
            (sa.func.sum(c.prompt_tokens + c.completion_tokens) * 1.0 / sa.func.count()).label("avg_tokens"),
            sa.func.sum(sa.case((c.unpriced, 1), else_=0)).label("unpriced"),
        )
        .where(c.ts >= week_ago)
        .group_by(c.feature)
        .order_by(total_usd.desc())
    )
    per_user = (
        sa.select(c.user_id, sa.func.count().label("calls"), total_usd.label("total_usd"))
        .where(c.ts >= week_ago)
        .group_by(c.user_id)
        .order_by(total_usd.desc())
        .limit(top_users)
    )
    day = sa.func.date(c.ts)
    daily = (
        sa.select(day.label("day"), c.feature, total_usd.label("daily_usd"))
        .where(c.ts >= month_ago)
        .group_by(day, c.feature)
        .order_by(day.desc(), total_usd.desc())
    )

    with store.read() as conn:
        feature_rows = conn.execute(per_feature).all()
        user_rows = conn.execute(per_user).all()
        daily_rows = conn.execute(daily).all()

    tables = (
        Table(
            "Cost per feature, last 7 days",
            ("feature", "calls", "total USD", "avg USD/call", "avg tokens", "unpriced calls"),
            [
                (
                    _label(row.feature),
                    row.calls,
                    _usd(row.total_usd, 2),
                    _usd(row.avg_call_usd, 4),
                    f"{float(row.avg_tokens or 0):.0f}",
                    row.unpriced,
                )
                for row in feature_rows
            ],
        ),
        Table(
            f"Top {top_users} users by cost, last 7 days",
            ("user", "calls", "total USD"),
            [(_label(row.user_id), row.calls, _usd(row.total_usd, 2)) for row in user_rows],
        ),
        Table(
            "Daily cost per feature, last 30 days",
            ("day", "feature", "USD"),
            [(str(row.day), _label(row.feature), _usd(row.daily_usd, 2)) for row in daily_rows],
        ),
    )
    return Report(generated_at=now, tables=tables)


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
