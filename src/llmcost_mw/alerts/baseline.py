"""Per-feature daily spend limits from each feature's own history.

A feature with at least `min_history_days` of history gets a limit of
`factor` times the p95 of its daily spend over the last 7 complete UTC days
(days without calls count as $0). A newer feature keeps the rule's hard
ceiling. Both read `cost_daily_feature`, which the watcher refreshes at the
start of each pass: a row per day, model and feature, so a year of history
costs a few thousand rows, not the raw table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..store import cost_daily_feature

__all__ = ["feature_daily_limits", "percentile"]

BASELINE_DAYS = 7


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the percentile by linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = fraction * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def feature_daily_limits(conn: Connection, binds: Mapping[str, Any]) -> dict[str, float]:
    """Return the daily spend limit of every feature that has enough history for a baseline.

    Reads the rule params `baseline_factor`, `baseline_percentile`,
    `min_history_days` and `min_threshold` from `binds`. Features left out
    use the rule's `threshold`, the hard ceiling.
    """
    now: datetime = binds["now"]
    today = now.date()
    first_baseline_day = today - timedelta(days=BASELINE_DAYS)
    oldest_allowed = today - timedelta(days=int(binds["min_history_days"]))
    d = cost_daily_feature.c

    first_days = conn.execute(
        sa.select(d.feature, sa.func.min(d.day)).where(d.feature.is_not(None)).group_by(d.feature)
    ).all()
    mature = {feature for feature, first in first_days if _as_date(first) <= oldest_allowed}
    if not mature:
        return {}

    spend: dict[str, dict[date, float]] = {feature: {} for feature in mature}
    rows = conn.execute(
        sa.select(d.feature, d.day, sa.func.sum(d.cost_usd))
        .where(d.day >= first_baseline_day, d.day < today, d.feature.in_(sorted(mature)))
        .group_by(d.feature, d.day)
    )
    for feature, day, cost in rows:
        spend[feature][_as_date(day)] = float(cost or 0.0)

    factor = float(binds["baseline_factor"])
    fraction = float(binds["baseline_percentile"]) / 100
    floor = float(binds["min_threshold"])
    limits = {}
    for feature, days in spend.items():
        daily = [days.get(first_baseline_day + timedelta(days=n), 0.0) for n in range(BASELINE_DAYS)]
        limits[feature] = max(factor * percentile(daily, fraction), floor)
    return limits


def _as_date(value: date | str) -> date:
    return date.fromisoformat(value) if isinstance(value, str) else value
