"""`llmcost exporter`: Prometheus metrics computed from the store.

The in-app `/metrics` counts only the calls of the processes that serve it.
This exporter reads `cost_events` instead, so it covers every process that
writes to the store (workers, cron jobs, scripts) without multiprocess mode.

A scrape costs time in proportion to the rows added since the previous one,
not to the size of the table. `StoreCollector` keeps running totals in memory
and, through the primary key, reads only rows with an `id` above the last one
it has seen. Spend in the current UTC hour and day is kept in per-hour and
per-day buckets that each new row adds to, and old buckets are dropped.

Metric names start with `llmcost_store_` so that they never collide with the
in-app `llmcost_*` metrics when Prometheus scrapes both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .events import utcnow
from .metrics import LABELS, TOKEN_TYPES, _BoundedLabel
from .retention import _MAX_ID as ROLLUP_MAX_ID_KEY
from .retention import _PRUNED_BEFORE as PRUNED_BEFORE_KEY
from .store import Store, cost_daily, cost_events, meta

__all__ = ["StoreCollector", "serve_exporter"]

logger = logging.getLogger(__name__)

# When more rows than this arrived since the last read (the first load, or a
# long pause between scrapes), the older ones are summed without tracking
# missing ids. The newest this many rows are always checked for missing ids.
DEFAULT_BULK_THRESHOLD_ROWS = 10_000

# On PostgreSQL, ids come from a sequence and transactions commit out of order,
# so a row with a lower id can appear after a higher one was read. Missing ids
# are looked up again on each scrape for this long. Rolled-back inserts and
# skipped duplicates leave ids that never appear; they expire after it.
DEFAULT_GAP_GRACE_SECONDS = 300.0
# Larger holes are deleted rows or sequence jumps rather than open transactions.
MAX_GAP_RANGE_IDS = 1_000
MAX_TRACKED_GAPS = 10_000
GAP_LOOKUP_CHUNK = 500

HOUR_KEY_FORMAT = "%Y-%m-%d %H"

_c = cost_events.c

# Running totals per (provider, model, feature): cost, then the token types.
_COST = 0
_TOKEN_SLOTS = {token_type: index + 1 for index, token_type in enumerate(TOKEN_TYPES)}


def _hour_key_expression(dialect: str) -> sa.ColumnElement[str]:
    """Return SQL that renders `ts` as `YYYY-MM-DD HH`, the same text as HOUR_KEY_FORMAT."""
    if dialect == "sqlite":
        # SQLite stores `ts` as `YYYY-MM-DD HH:MM:SS.ffffff` text.
        return sa.func.substr(_c.ts, 1, 13, type_=sa.String)
    return sa.func.to_char(_c.ts, "YYYY-MM-DD HH24", type_=sa.String)


class StoreCollector(Collector):
    """A custom collector that serves running totals of `cost_events`.

    Register it in a `CollectorRegistry`; each collect reads the new rows
    first. `refresh()` can be called before serving so that the first load
    of a large table does not run inside a scrape. `clock` returns the current
    UTC time as a naive datetime, like `events.utcnow`.
    """

    def __init__(
        self,
        store: Store,
        *,
        max_features: int = 100,
        allowed_features: Iterable[str] | None = None,
        max_models: int = 100,
        clock: Callable[[], datetime] = utcnow,
        bulk_threshold_rows: int = DEFAULT_BULK_THRESHOLD_ROWS,
        gap_grace_seconds: float = DEFAULT_GAP_GRACE_SECONDS,
    ) -> None:
        self.store = store
        self._clock = clock
        self._bulk_threshold_rows = bulk_threshold_rows
        self._gap_grace_seconds = gap_grace_seconds
        self._feature_label = _BoundedLabel("feature", max_features, allowed_features)
        self._model_label = _BoundedLabel("model", max_models, None)
        self._hour_key = _hour_key_expression(store.dialect)
        self._lock = threading.Lock()

        # 0 while reads of the store fail; collect() logs when this changes.
        self._up = 1
        self._refresh_seconds = 0.0
        self._clear_totals()

    def _clear_totals(self) -> None:
        self.last_seen_id = 0
        self._totals: dict[tuple[str, str, str], list[float]] = {}
        self._calls: dict[tuple[str, str, str, str], int] = {}
        self._unpriced: dict[tuple[str, str], int] = {}
        self._hour_cost: dict[tuple[str, tuple[str, str, str]], float] = {}
        self._day_cost: dict[tuple[str, tuple[str, str, str]], float] = {}
        # Missing id -> time.monotonic() when it was first noticed.
        self._gaps: dict[int, float] = {}

    # -- reading the store ------------------------------------------------------

    def refresh(self) -> None:
        """Read the rows added since the last refresh into the running totals.

        Raises SQLAlchemyError when the store cannot be read; the totals are
        then unchanged.
        """
        with self._lock:
            self._refresh_locked()
            self._up = 1

    def _refresh_locked(self) -> str:
        """Read new rows and return the current hour key that the windows now use."""
        started = time.perf_counter()
        current_hour = self._clock().strftime(HOUR_KEY_FORMAT)
        self._drop_old_buckets(current_hour)
        saved = self._save_state()
        try:
            self._read_new_rows(current_hour[:10])
        except BaseException:
            # A read that fails halfway must not leave rows counted without
            # advancing last_seen_id, or the next read would count them again.
            self._restore_state(saved)
            raise
        self._refresh_seconds = time.perf_counter() - started
        return current_hour

    def _save_state(self) -> tuple[Any, ...]:
        return (
            self.last_seen_id,
            {labels: totals[:] for labels, totals in self._totals.items()},
            dict(self._calls),
            dict(self._unpriced),
            dict(self._hour_cost),
            dict(self._day_cost),
            dict(self._gaps),
        )

    def _restore_state(self, saved: tuple[Any, ...]) -> None:
        (self.last_seen_id, self._totals, self._calls, self._unpriced,
         self._hour_cost, self._day_cost, self._gaps) = saved

    def _read_new_rows(self, today: str) -> None:
        self.store.ensure_schema()
        with self.store.read() as conn:
            # An empty table (every row pruned or deleted) leaves the totals as they are.
            max_id = conn.execute(sa.select(sa.func.max(_c.id))).scalar() or self.last_seen_id
            if max_id < self.last_seen_id:
                # Ids were handed out again (the table was recreated, say): start over from the table.
                logger.warning(
                    "the highest cost_events id went down from %d to %d; reloading the totals from the table",
                    self.last_seen_id, max_id,
                )
                self._clear_totals()
            low = self.last_seen_id
            row_filter = self._add_pruned_days(conn) if low == 0 else ()
            if max_id - low > self._bulk_threshold_rows:
                base = max_id - self._bulk_threshold_rows
                self._add_aggregates(conn, low, base, today, *row_filter)
                low = base
            self._add_rows(conn, low, max_id, today, *row_filter)
            self.last_seen_id = max_id
            self._look_up_gaps(conn, today)

    def _labels(self, provider: str, model: str, feature: str | None) -> tuple[str, str, str]:
        return provider, self._model_label(model), self._feature_label(feature)

    def _add_pruned_days(self, conn: Any) -> tuple[Any, ...]:
        """Add the daily totals of days whose raw rows `llmcost prune` deleted.

        Returns the filter that leaves out the raw rows those totals already
        hold. Without this, a restart after a prune would lower the counters,
        and Prometheus would read the drop as a reset and count the whole
        remaining total as new spend.
        """
        keys = [PRUNED_BEFORE_KEY, ROLLUP_MAX_ID_KEY]
        settings = dict(conn.execute(sa.select(meta.c.key, meta.c.value).where(meta.c.key.in_(keys))).all())
        if not settings.get(PRUNED_BEFORE_KEY):
            return ()
        cutoff = datetime.fromisoformat(settings[PRUNED_BEFORE_KEY])
        rolled_up_max_id = int(settings.get(ROLLUP_MAX_ID_KEY) or 0)
        daily = cost_daily.c
        pruned = (
            sa.select(
                daily.provider, daily.model, daily.feature,
                sa.func.sum(daily.calls), sa.func.sum(daily.error_calls), sa.func.sum(daily.unpriced_calls),
                sa.func.sum(daily.cost_usd),
                sa.func.sum(daily.input_tokens),
                sa.func.sum(daily.output_tokens),
                sa.func.sum(daily.cache_read_tokens),
                sa.func.sum(daily.cache_write_tokens),
            )
            .where(daily.day < cutoff.date())
            .group_by(daily.provider, daily.model, daily.feature)
        )
        for row in conn.execute(pruned):
            provider, model, feature, calls, error_calls, unpriced_calls, cost, *tokens = row
            labels = self._labels(provider, model, feature)
            # NOTE: the daily totals keep only the error count, so a restart
            # after a prune counts incomplete and not_consumed calls of pruned
            # days as ok.
            error_calls = int(error_calls or 0)
            for status, count in (("ok", int(calls) - error_calls), ("error", error_calls)):
                if count:
                    self._add_calls(labels, status, False, count)
            if unpriced_calls:
                unpriced_key = (labels[0], labels[1])
                self._unpriced[unpriced_key] = self._unpriced.get(unpriced_key, 0) + int(unpriced_calls)
            self._add_totals(labels, cost, tokens)
        # Raw rows of pruned days that are still there arrived after the prune.
        # Those up to the roll-up's highest id are already in the daily totals.
        return (sa.or_(_c.ts >= cutoff, _c.id > rolled_up_max_id),)

    def _add_aggregates(self, conn: Any, low: int, high: int, today: str, *row_filter: Any) -> None:
        """Add rows `low < id <= high` through GROUP BY queries, for large ranges."""
        in_range = sa.and_(_c.id > low, _c.id <= high, *row_filter)
        totals = (
            sa.select(
                _c.provider, _c.model, _c.feature, _c.status, _c.unpriced,
                sa.func.count(),
                sa.func.sum(_c.cost_usd),
                sa.func.sum(_c.input_tokens),
                sa.func.sum(_c.output_tokens),
                sa.func.sum(_c.cache_read_tokens),
                sa.func.sum(_c.cache_write_5m_tokens + _c.cache_write_1h_tokens),
            )
            .where(in_range)
            .group_by(_c.provider, _c.model, _c.feature, _c.status, _c.unpriced)
        )
        for provider, model, feature, status, unpriced, calls, cost, *tokens in conn.execute(totals):
            labels = self._labels(provider, model, feature)
            self._add_calls(labels, status, bool(unpriced), int(calls))
            self._add_totals(labels, cost, tokens)

        # Only today's rows count toward the hour and day windows.
        day_start = datetime.strptime(today, "%Y-%m-%d")
        windows = (
            sa.select(_c.provider, _c.model, _c.feature, self._hour_key, sa.func.sum(_c.cost_usd))
            .where(in_range, _c.ts >= day_start)
            .group_by(_c.provider, _c.model, _c.feature, self._hour_key)
        )
        for provider, model, feature, hour, cost in conn.execute(windows):
            if cost:
                self._add_windows(self._labels(provider, model, feature), hour, float(cost), today)

    def _grouped_query(self, *where: Any) -> sa.Select[Any]:
        """Sum the rows that match `where` per label set, status and UTC hour."""
        return (
            sa.select(
                _c.provider, _c.model, _c.feature, _c.status, _c.unpriced, self._hour_key,
                sa.func.count(),
                sa.func.sum(_c.cost_usd),
                sa.func.sum(_c.input_tokens),
                sa.func.sum(_c.output_tokens),
                sa.func.sum(_c.cache_read_tokens),
                sa.func.sum(_c.cache_write_5m_tokens + _c.cache_write_1h_tokens),
            )
            .where(*where)
            .group_by(_c.provider, _c.model, _c.feature, _c.status, _c.unpriced, self._hour_key)
        )

    def _add_grouped(self, conn: Any, today: str, *where: Any) -> int:
        """Add the rows that match `where` and return how many there were."""
        rows = 0
        for provider, model, feature, status, unpriced, hour, calls, cost, *tokens in conn.execute(
            self._grouped_query(*where)
        ):
            labels = self._labels(provider, model, feature)
            self._add_calls(labels, status, bool(unpriced), int(calls))
            self._add_totals(labels, cost, tokens)
            if cost:
                self._add_windows(labels, hour, float(cost), today)
            rows += int(calls)
        return rows

    def _add_rows(self, conn: Any, low: int, high: int, today: str, *row_filter: Any) -> None:
        """Add rows `low < id <= high` and remember the ids in that range that are missing.

        The database sums the rows, so the Python work follows the number of
        label sets, not of rows. Ids are fetched only when the count shows
        that some are missing, or that `row_filter` left some out.
        """
        if high <= low:
            return
        in_range = (_c.id > low, _c.id <= high)
        if self._add_grouped(conn, today, *in_range, *row_filter) == high - low:
            return
        expected = low + 1
        for row_id in conn.execute(sa.select(_c.id).where(*in_range).order_by(_c.id)).scalars():
            if row_id > expected:
                self._note_gap(expected, row_id)
            expected = row_id + 1
        if expected <= high:
            self._note_gap(expected, high + 1)

    def _add_calls(self, labels: tuple[str, str, str], status: str, unpriced: bool, count: int) -> None:
        key = (*labels, status)
        self._calls[key] = self._calls.get(key, 0) + count
        if unpriced:
            unpriced_key = (labels[0], labels[1])
            self._unpriced[unpriced_key] = self._unpriced.get(unpriced_key, 0) + count

    def _add_totals(self, labels: tuple[str, str, str], cost: Any, tokens: list[Any]) -> None:
        # float(): PostgreSQL returns SUM() of integer columns as Decimal.
        totals = self._totals.get(labels)
        if totals is None:
            totals = self._totals[labels] = [0.0] * (1 + len(TOKEN_TYPES))
        if cost:
            totals[_COST] += float(cost)
        for token_type, count in zip(TOKEN_TYPES, tokens, strict=True):
            if count:
                totals[_TOKEN_SLOTS[token_type]] += float(count)

    def _add_windows(self, labels: tuple[str, str, str], hour: str, cost: float, today: str) -> None:
        if hour < today:
            return
        hour_key = (hour, labels)
        self._hour_cost[hour_key] = self._hour_cost.get(hour_key, 0.0) + cost
        day_key = (hour[:10], labels)
        self._day_cost[day_key] = self._day_cost.get(day_key, 0.0) + cost

    def _drop_old_buckets(self, current_hour: str) -> None:
        today = current_hour[:10]
        for key in [key for key in self._hour_cost if key[0] < current_hour]:
            del self._hour_cost[key]
        for key in [key for key in self._day_cost if key[0] < today]:
            del self._day_cost[key]

    # -- ids that were missing when a later id was read ---------------------------

    def _note_gap(self, start: int, stop: int) -> None:
        if stop - start > MAX_GAP_RANGE_IDS:
            return
        noticed = time.monotonic()
        for missing_id in range(start, stop):
            if len(self._gaps) >= MAX_TRACKED_GAPS:
                # Dicts keep insertion order, so this drops the oldest gap.
                del self._gaps[next(iter(self._gaps))]
            self._gaps[missing_id] = noticed

    def _look_up_gaps(self, conn: Any, today: str) -> None:
        if not self._gaps:
            return
        expired_before = time.monotonic() - self._gap_grace_seconds
        for missing_id in [key for key, noticed in self._gaps.items() if noticed < expired_before]:
            del self._gaps[missing_id]
        missing = sorted(self._gaps)
        for start in range(0, len(missing), GAP_LOOKUP_CHUNK):
            chunk = missing[start : start + GAP_LOOKUP_CHUNK]
            found = list(conn.execute(sa.select(_c.id).where(_c.id.in_(chunk))).scalars())
            if found:
                self._add_grouped(conn, today, _c.id.in_(found))
                for row_id in found:
                    del self._gaps[row_id]

    # -- exposition ---------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        # Without describe(), registering the collector would run collect()
        # and with it the first load of the table.
        return list(self._families(current_hour=None))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            try:
                current_hour = self._refresh_locked()
            except sa.exc.SQLAlchemyError:
                # Serve the last totals with up=0 rather than fail the scrape,
                # and log once per outage rather than on every scrape.
                if self._up:
                    logger.exception(
                        "reading the store %s failed; serving the last totals until it recovers",
                        self.store.safe_url,
                    )
                self._up = 0
                current_hour = self._clock().strftime(HOUR_KEY_FORMAT)
            else:
                if not self._up:
                    logger.info("reading the store %s works again", self.store.safe_url)
                self._up = 1
            return list(self._families(current_hour))

    def _families(self, current_hour: str | None) -> Iterator[Metric]:
        cost = CounterMetricFamily(
            "llmcost_store_cost_usd", "Cost of LLM calls in the store, in US dollars.", labels=LABELS
        )
        tokens = CounterMetricFamily(
            "llmcost_store_tokens",
            "Tokens of LLM calls in the store by type: input is uncached input; "
            "cache_write and cache_read are the cache buckets.",
            labels=(*LABELS, "token_type"),
        )
        calls = CounterMetricFamily(
            "llmcost_store_calls", "LLM calls in the store by final status.", labels=(*LABELS, "status")
        )
        unpriced = CounterMetricFamily(
            "llmcost_store_unpriced_calls",
            "LLM calls in the store whose model was missing from the price table.",
            labels=("provider", "model"),
        )
        hour_cost = GaugeMetricFamily(
            "llmcost_store_current_hour_cost_usd",
            "Cost of LLM calls with a timestamp in the current UTC clock hour, in US dollars.",
            labels=LABELS,
        )
        day_cost = GaugeMetricFamily(
            "llmcost_store_current_day_cost_usd",
            "Cost of LLM calls with a timestamp in the current UTC day, in US dollars.",
            labels=LABELS,
        )
        up = GaugeMetricFamily("llmcost_store_up", "1 if the last read of the store succeeded, else 0.")
        read_seconds = GaugeMetricFamily(
            "llmcost_store_read_duration_seconds", "Time the last read of new rows from the store took."
        )
        last_id = GaugeMetricFamily("llmcost_store_last_event_id", "Highest cost_events id read so far.")

        if current_hour is not None:
            today = current_hour[:10]
            for labels, totals in self._totals.items():
                cost.add_metric(labels, totals[_COST])
                for token_type in TOKEN_TYPES:
                    tokens.add_metric((*labels, token_type), totals[_TOKEN_SLOTS[token_type]])
                hour_cost.add_metric(labels, self._hour_cost.get((current_hour, labels), 0.0))
                day_cost.add_metric(labels, self._day_cost.get((today, labels), 0.0))
            for key, count in self._calls.items():
                calls.add_metric(key, count)
            for key, count in self._unpriced.items():
                unpriced.add_metric(key, count)
            up.add_metric([], self._up)
            read_seconds.add_metric([], self._refresh_seconds)
            last_id.add_metric([], self.last_seen_id)
        yield from (cost, tokens, calls, unpriced, hour_cost, day_cost, up, read_seconds, last_id)


def serve_exporter(
    store: Store,
    *,
    host: str = "127.0.0.1",
    port: int,
    stop: threading.Event,
    collector: StoreCollector | None = None,
) -> None:
    """Load the store's totals, then serve them on http://host:port/ until `stop` is set."""
    collector = collector or StoreCollector(store)
    started = time.perf_counter()
    collector.refresh()
    logger.info(
        "loaded the totals of %s up to cost_events id %d in %.1f s",
        store.safe_url, collector.last_seen_id, time.perf_counter() - started,
    )
    registry = CollectorRegistry()
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    logger.info("exporter serving metrics on http://%s:%d/metrics", host, server.server_port)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        logger.info("exporter stopped")

