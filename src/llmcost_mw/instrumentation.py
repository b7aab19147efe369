"""`instrument()`: wire the price table, metrics and recorder to the patched SDKs."""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import Any

from anthropic._base_client import AsyncAPIClient

from prometheus_client import REGISTRY, CollectorRegistry

from .context import attribute
from .errors import ConfigurationError
from .metrics import Metrics
from .pricing import PriceBook
from .recorder import Recorder
from .store import DEFAULT_DATABASE_URL, Store
from .tracker import Tracker

__all__ = ["current_tracker", "instrument", "tracked_create", "uninstrument"]

_lock = threading.Lock()
_tracker: Tracker | None = None
# Weak keys: a registry that is gone must not hand its Metrics to a new
# registry that happens to get the same id.
_metrics_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()


def instrument(
    *,
    database_url: str = DEFAULT_DATABASE_URL,
    store: Store | None = None,
    recorder: Recorder | None = None,
    price_book: PriceBook | None = None,
    registry: CollectorRegistry | None = REGISTRY,
    metrics: Metrics | None = None,
    strict: bool = False,
    durability: str = "batch",
) -> Tracker:
    """Record every Anthropic SDK call made from now on in this process.

    Patches the SDK once; calling it again replaces the configuration. Pass
    `registry=None` to turn the Prometheus metrics off, and `strict=True` to
    raise `UnpricedModelError` for models missing from the price table (the
    row is still written). Returns the tracker, whose `recorder.flush()`
    waits for queued rows.
    """
    global _tracker
    from .providers import anthropic as anthropic_provider

    with _lock:
        if recorder is None:
            recorder = Recorder(store or Store(database_url), durability=durability)
        if metrics is None and registry is not None:
            metrics = _metrics_for(registry)
        if metrics is not None:
            recorder._on_queue_depth = metrics.queued.set
        tracker = Tracker(recorder, price_book=price_book, metrics=metrics, strict=strict)
        previous = _tracker
        anthropic_provider.patch(tracker)
        _tracker = tracker
    if previous is not None and previous.recorder is not recorder:
        previous.recorder.flush()
    return tracker


def uninstrument() -> None:
    """Write what is queued and restore the SDKs' own methods."""
    global _tracker
    from .providers import anthropic as anthropic_provider

    with _lock:
        tracker, _tracker = _tracker, None
        anthropic_provider.unpatch()
    if tracker is not None:
        tracker.recorder.flush()


def current_tracker() -> Tracker | None:
    """Return the tracker set by the last `instrument()`, or None."""
    return _tracker


def _metrics_for(registry: CollectorRegistry) -> Metrics:
    # A metric name can be registered once per registry, so one Metrics
    # object serves every `instrument()` call with the same registry.
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = Metrics(registry)
        _metrics_by_registry[registry] = metrics
    return metrics


def tracked_create(client: Any, *, feature: str | None = None, user_id: str | None = None, **kwargs: Any) -> Any:
    """Call `client.messages.create(**kwargs)` billed to an explicit feature and user.

    A drop-in for code that passes attribution by hand. Works with sync and
    async clients; for an async client, await the result. Instruments the
    process with default settings if `instrument()` was not called.
    """
    if feature is None and user_id is None:
        raise ConfigurationError("tracked_create() needs feature= or user_id=; otherwise call client.messages.create")
    if _tracker is None:
        instrument()
    create = client.messages.create
    scope = attribute(**{k: v for k, v in (("feature", feature), ("user_id", user_id)) if v is not None})
    # The SDK wraps `AsyncMessages.create` in a plain function, so an async
    # call is detected from the client's type, not from the method.
    if isinstance(client, AsyncAPIClient) or inspect.iscoroutinefunction(inspect.unwrap(create)):

        async def call_async() -> Any:
            with scope:
                return await create(**kwargs)

        return call_async()
    with scope:
        return create(**kwargs)
