"""Prometheus metrics for LLM calls, and the ASGI app that serves them.

Labels are provider, model and feature; never the user, whose numbers live in
SQL. The feature and model labels are bounded: past the limit, new values are
counted under `other` and a warning is logged once, so a client cannot grow
memory without limit. `docs/metrics.md` lists every metric with its
OpenTelemetry GenAI counterpart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app, make_wsgi_app
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

from .events import CostEvent

__all__ = ["Metrics", "OTHER_LABEL", "make_metrics_asgi_app", "make_metrics_wsgi_app"]

logger = logging.getLogger(__name__)

OTHER_LABEL = "other"

# LLM calls take from tens of milliseconds to minutes.
DURATION_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

TOKEN_TYPES = ("input", "output", "cache_read", "cache_write")


class _BoundedLabel:
    """Admits at most `max_values` distinct label values, or only an allow-list."""

    def __init__(self, name: str, max_values: int, allowed: Iterable[str] | None) -> None:
        self.name = name
        self.max_values = max_values
        self.allowed = frozenset(allowed) if allowed is not None else None
        self._seen: set[str] = set()
        self._warned = False
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        value = value or "unknown"
        if self.allowed is not None:
            return value if value in self.allowed else self._overflow(value)
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.max_values:
                self._seen.add(value)
                return value
        return self._overflow(value)

    def _overflow(self, value: str) -> str:
        if not self._warned:
            self._warned = True
            logger.warning(
                "the %s label reached its limit; %r and later new values are counted as %r "
                "(raise max_%ss or pass allowed_%ss to change this)",
                self.name,
                value,
                OTHER_LABEL,
                self.name,
                self.name,
            )
        return OTHER_LABEL


class Metrics:
    """The package's Prometheus metrics in one registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = DEFAULT_REGISTRY,
        *,
        max_features: int = 100,
        allowed_features: Iterable[str] | None = None,
        max_models: int = 100,
    ) -> None:
        labels = ("provider", "model", "feature")
        self.cost = Counter(
            "llmcost_cost_usd", "Cost of LLM calls in US dollars.", labels, registry=registry
        )
        self.tokens = Counter(
            "llmcost_tokens",
            "Tokens of LLM calls by type: input is uncached input; cache_write and cache_read are the cache buckets.",
            (*labels, "token_type"),
            registry=registry,
        )
        self.calls = Counter(
            "llmcost_calls", "LLM calls by final status.", (*labels, "status"), registry=registry
        )
        self.duration = Histogram(
            "llmcost_call_duration_seconds",
            "Duration of LLM calls, retries and streaming included.",
            labels,
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.unpriced = Counter(
            "llmcost_unpriced_calls",
            "LLM calls whose model is missing from the price table, so their cost is unknown.",
            ("provider", "model"),
            registry=registry,
        )
        self.queued = Gauge(
            "llmcost_recorder_queued_events",
            "Cost events waiting to be written to the store.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._feature_label = _BoundedLabel("feature", max_features, allowed_features)
        self._model_label = _BoundedLabel("model", max_models, None)
        self._children: dict[tuple[str, str, str], tuple[Any, ...]] = {}

    def _series(self, provider: str, model: str, feature: str) -> tuple[Any, ...]:
        key = (provider, model, feature)
        series = self._children.get(key)
        if series is None:
            series = (
                self.cost.labels(*key),
                *(self.tokens.labels(*key, token_type) for token_type in TOKEN_TYPES),
                self.duration.labels(*key),
            )
            self._children[key] = series
        return series

    def observe(self, event: CostEvent) -> None:
        """Count one recorded call."""
        model = self._model_label(event.model)
        feature = self._feature_label(event.feature)
        cost, input_tokens, output_tokens, cache_read, cache_write, duration = self._series(
            event.provider, model, feature
        )
        usage = event.usage
        if event.cost_usd is not None:
            cost.inc(float(event.cost_usd))
        if usage.input_tokens:
            input_tokens.inc(usage.input_tokens)
        if usage.output_tokens:
            output_tokens.inc(usage.output_tokens)
        if usage.cache_read_tokens:
            cache_read.inc(usage.cache_read_tokens)
        if usage.cache_write_tokens:
            cache_write.inc(usage.cache_write_tokens)
        duration.observe(event.latency_ms / 1000)
        self.calls.labels(event.provider, model, feature, event.status).inc()
        if event.unpriced:
            self.unpriced.labels(event.provider, model).inc()


def _multiprocess_registry() -> CollectorRegistry | None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def make_metrics_asgi_app(registry: CollectorRegistry | None = None) -> Any:
    """Return an ASGI app serving the metrics, to mount at `/metrics`.

    Under several workers with `PROMETHEUS_MULTIPROC_DIR` set, it serves the
    totals summed over all worker processes.
    """
    return make_asgi_app(registry=registry or _multiprocess_registry() or DEFAULT_REGISTRY)


def make_metrics_wsgi_app(registry: CollectorRegistry | None = None) -> Any:
    """Return a WSGI app serving the metrics; see `make_metrics_asgi_app`."""
    return make_wsgi_app(registry=registry or _multiprocess_registry() or DEFAULT_REGISTRY)
