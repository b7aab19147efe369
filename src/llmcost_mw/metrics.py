"""Prometheus metrics for LLM calls, and the ASGI and WSGI apps that serve them.

Labels are provider, model and feature; never the user, whose numbers live in
SQL. The feature and model labels are bounded: past the limit, new values are
counted under `other` and a warning is logged once, so a client cannot grow
memory without limit. `docs/metrics.md` lists every metric with its
OpenTelemetry GenAI counterpart.

Under several worker processes, set `PROMETHEUS_MULTIPROC_DIR` in the
environment before the processes start: prometheus_client picks its value
storage when it is first imported, and `make_metrics_asgi_app` then serves the
totals summed over every worker's files.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app, make_wsgi_app

from .errors import ConfigurationError
from .events import CostEvent

__all__ = [
    "CALL_COST_BUCKETS_USD",
    "DURATION_BUCKETS_SECONDS",
    "LABELS",
    "Metrics",
    "OTHER_LABEL",
    "TOKEN_TYPES",
    "UNKNOWN_LABEL",
    "make_metrics_asgi_app",
    "make_metrics_wsgi_app",
]

logger = logging.getLogger(__name__)

LABELS = ("provider", "model", "feature")
OTHER_LABEL = "other"
# The label value of calls made without a feature (or with an empty model name).
UNKNOWN_LABEL = "unknown"

# LLM calls take from tens of milliseconds to minutes.
DURATION_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

# One call costs from a fraction of a cent to a few dollars. The 0.5 bound is
# the single-call ceiling that the Prometheus alert rules in deploy/prometheus
# test, so keep a bucket at each ceiling an alert uses.
CALL_COST_BUCKETS_USD = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")


class _BoundedLabel:
    """Admits at most `max_values` distinct label values, or only an allow-list.

    `unknown` (a missing value) always passes, so that calls without
    attribution stay visible.
    """

    def __init__(self, name: str, max_values: int, allowed: Iterable[str] | None) -> None:
        if max_values < 1:
            raise ConfigurationError(f"invalid max_{name}s {max_values!r}: it must be at least 1")
        self.name = name
        self.max_values = max_values
        self.allowed = frozenset(allowed) if allowed is not None else None
        self._seen: set[str] = set()
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or UNKNOWN_LABEL
        if self.allowed is not None:
            if value in self.allowed or value == UNKNOWN_LABEL:
                return value
            return self._overflow(value)
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.max_values:
                self._seen.add(value)
                return value
        return self._overflow(value)

    def _overflow(self, value: str) -> str:
        with self._lock:
            if self._warned:
                return OTHER_LABEL
            self._warned = True
        if self.allowed is not None:
            logger.warning(
                "the %s %r is not in allowed_%ss; it and every other unlisted %s are counted as %r",
                self.name, value, self.name, self.name, OTHER_LABEL,
            )
        else:
            logger.warning(
                "the %s label reached its limit of %d values; %r and later new values are counted as %r "
                "(raise max_%ss or pass allowed_%ss to change this)",
                self.name, self.max_values, value, OTHER_LABEL, self.name, self.name,
            )
        return OTHER_LABEL


class Metrics:
    """The package's Prometheus metrics in one registry.

    `max_features` and `max_models` bound the distinct label values per
    process; `allowed_features` replaces the feature bound with a fixed list.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = DEFAULT_REGISTRY,
        *,
        max_features: int = 100,
        allowed_features: Iterable[str] | None = None,
        max_models: int = 100,
    ) -> None:
        self.cost = Counter(
            "llmcost_cost_usd", "Cost of LLM calls in US dollars.", LABELS, registry=registry
        )
        self.tokens = Counter(
            "llmcost_tokens",
            "Tokens of LLM calls by type: input is uncached input; cache_write and cache_read are the cache buckets.",
            (*LABELS, "token_type"),
            registry=registry,
        )
        self.calls = Counter(
            "llmcost_calls", "LLM calls by final status.", (*LABELS, "status"), registry=registry
        )

        self.duration = Histogram(
            "llmcost_call_duration_seconds",
            "Duration of LLM calls, retries and streaming included.",
            LABELS,
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.call_cost = Histogram(
            "llmcost_call_cost_usd",
            "Cost of single priced LLM calls in US dollars.",
            LABELS,
            buckets=CALL_COST_BUCKETS_USD,
            registry=registry,
        )

        self.unpriced = Counter(
            "llmcost_unpriced_calls",
            "LLM calls whose model is missing from the price table, so their cost is unknown.",
            ("provider", "model"),
            registry=registry,
        )

        # livesum: in multiprocess mode, the sum over the workers that are alive.
        self.queued = Gauge(
            "llmcost_recorder_queued_events",
            "Cost events waiting to be written to the store.",
            registry=registry,
            multiprocess_mode="livesum",
        )

        self._feature_label = _BoundedLabel("feature", max_features, allowed_features)
        self._model_label = _BoundedLabel("model", max_models, None)
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._calls_children: dict[tuple[str, str, str, str], Any] = {}

    def _series(self, provider: str, model: str, feature: str) -> tuple[Any, ...]:
        # Looking a child up by its labels takes a lock inside prometheus_client,
        # so caching the children keeps observe() at a few microseconds.
        key = (provider, model, feature)
        series = self._children.get(key)
        if series is None:
            series = (
                self.cost.labels(*key),
                *(self.tokens.labels(*key, token_type) for token_type in TOKEN_TYPES),
                self.duration.labels(*key),
                self.call_cost.labels(*key),
            )
            self._children[key] = series
        return series

    def _calls_child(self, provider: str, model: str, feature: str, status: str) -> Any:
        key = (provider, model, feature, status)
        child = self._calls_children.get(key)
        if child is None:
            child = self.calls.labels(*key)
            self._calls_children[key] = child
        return child

    def observe(self, event: CostEvent) -> None:
        """Count one recorded call."""
        model = self._model_label(event.model)
        feature = self._feature_label(event.feature)
        cost, input_tokens, output_tokens, cache_read, cache_write, duration, call_cost = self._series(
            event.provider, model, feature
        )
        usage = event.usage
        if event.cost_usd is not None:
            amount = float(event.cost_usd)
            cost.inc(amount)
            call_cost.observe(amount)
        if usage.input_tokens:
            input_tokens.inc(usage.input_tokens)
        if usage.output_tokens:
            output_tokens.inc(usage.output_tokens)
        if usage.cache_read_tokens:
            cache_read.inc(usage.cache_read_tokens)
        if usage.cache_write_tokens:
            cache_write.inc(usage.cache_write_tokens)
        duration.observe(event.latency_ms / 1000)
        self._calls_child(event.provider, model, feature, event.status).inc()
        if event.unpriced:
            self.unpriced.labels(event.provider, model).inc()


def _multiprocess_registry() -> CollectorRegistry | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    from prometheus_client import multiprocess, values

    if values.ValueClass is values.MutexValue:
        # The variable was set after prometheus_client was imported: this
        # process keeps its numbers in memory, and /metrics would serve only
        # the files of other processes.
        raise ConfigurationError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} was set after prometheus_client was imported; "
            "set it in the environment before the process starts (deploy/gunicorn.conf.py does this)"
        )
    if not os.path.isdir(path):
        raise ConfigurationError(
            f"PROMETHEUS_MULTIPROC_DIR={path!r} is not a directory; "
            "create it (empty) before the workers start"
        )
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


def make_metrics_asgi_app(registry: CollectorRegistry | None = None) -> Any:
    """Return an ASGI app serving the metrics, to mount at `/metrics`.

    With `PROMETHEUS_MULTIPROC_DIR` set and no `registry`, it serves the totals
    summed over all worker processes, read from their files on each scrape.
    Raises ConfigurationError when that directory is missing, or when the
    variable was set too late to take effect in this process.
    """
    app = make_asgi_app(registry=registry or _multiprocess_registry() or DEFAULT_REGISTRY)

    async def metrics_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            _count_pending()
        await app(scope, receive, send)

    return metrics_app


def make_metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Any:
    """Return a WSGI app serving the metrics; see `make_metrics_asgi_app`."""
    app = make_wsgi_app(registry=registry or _multiprocess_registry() or DEFAULT_REGISTRY)

    def metrics_app(environ: Any, start_response: Any) -> Any:
        _count_pending()
        return app(environ, start_response)

    return metrics_app


def _count_pending() -> None:
    """Count the calls that this process's tracker has queued but not counted yet.

    The tracker counts calls on the recorder's writer thread, up to its flush
    interval after each call. A scrape must not miss the calls made just
    before it. Other worker processes count theirs within that interval.
    """
    from .instrumentation import current_tracker

    tracker = current_tracker()
    if tracker is not None:
        tracker.process_pending()
