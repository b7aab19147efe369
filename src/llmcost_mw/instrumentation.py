"""`instrument()`: wire the price table, metrics and recorder to the patched SDKs.

The `anthropic` SDK is always patched. The `openai` SDK is patched too when
it is installed, and skipped when it is not.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import threading
import weakref
from typing import Any

from anthropic._base_client import AsyncAPIClient as AnthropicAsyncClient
from prometheus_client import REGISTRY, CollectorRegistry

from .context import attribute
from .errors import ConfigurationError
from .metrics import Metrics
from .pricing import PriceBook
from .recorder import Recorder
from .store import DEFAULT_DATABASE_URL, Store
from .tracker import Tracker

__all__ = ["current_tracker", "instrument", "tracked_create", "uninstrument"]

logger = logging.getLogger(__name__)

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
    """Record every Anthropic and OpenAI SDK call made from now on in this process.

    Patches each SDK once; calling it again replaces the configuration. The
    openai SDK is patched only when it is installed; an installed version
    outside the supported range is logged as a warning and not patched. Pass
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
        _patch_openai(tracker)
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
        if _openai_installed():
            from .providers import openai as openai_provider

            openai_provider.unpatch()
    if tracker is not None:
        tracker.recorder.flush()


def _patch_openai(tracker: Tracker) -> None:
    """Patch the openai SDK when it is installed; warn and go on when its version is not supported.

    A process that calls only Anthropic may have any openai version
    installed for other reasons, so that alone must not stop it.
    """
    if not _openai_installed():
        return
    from .providers import openai as openai_provider

    try:
        openai_provider.patch(tracker)
    except ConfigurationError as exc:
        logger.warning("OpenAI calls are not recorded: %s", exc)


def _openai_installed() -> bool:
    return importlib.util.find_spec("openai") is not None


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
    """Create a message or chat completion billed to an explicit feature and user.

    Calls `client.messages.create(**kwargs)` for an Anthropic client and
    `client.chat.completions.create(**kwargs)` for an OpenAI or Azure OpenAI
    client. A drop-in for code that passes attribution by hand. Works with
    sync and async clients; for an async client, await the result.
    Instruments the process with default settings if `instrument()` was not
    called.
    """
    if feature is None and user_id is None:
        raise ConfigurationError(
            "tracked_create() needs feature= or user_id=; otherwise call the client's create method directly"
        )
    if _tracker is None:
        instrument()
    create, is_async = _create_method(client)
    scope = attribute(**{k: v for k, v in (("feature", feature), ("user_id", user_id)) if v is not None})
    if is_async:

        async def call_async() -> Any:
            with scope:
                return await create(**kwargs)

        return call_async()
    with scope:
        return create(**kwargs)


def _create_method(client: Any) -> tuple[Any, bool]:
    """Return the create method of an SDK client, and whether it is async."""
    openai_async = _openai_async_client_class()
    if openai_async is not None and _is_openai_client(client):
        create = client.chat.completions.create
        return create, isinstance(client, openai_async)
    create = client.messages.create
    # The SDK wraps `AsyncMessages.create` in a plain function, so an async
    # call is detected from the client's type, not from the method.
    is_async = isinstance(client, AnthropicAsyncClient) or inspect.iscoroutinefunction(inspect.unwrap(create))
    return create, is_async


def _openai_async_client_class() -> type | None:
    if not _openai_installed():
        return None
    from openai._base_client import AsyncAPIClient

    return AsyncAPIClient


def _is_openai_client(client: Any) -> bool:
    from openai._base_client import BaseClient

    return isinstance(client, BaseClient)
