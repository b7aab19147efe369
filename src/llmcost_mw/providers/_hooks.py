"""Wrappers that the provider modules share: the hook around an SDK client's `request()`.

Both SDKs are generated from one template, so their `request()` takes the
same arguments and runs the retry loop inside. A provider module passes its
own functions that start a call, record a failure and settle a result.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["install", "observe", "on_drop", "request_wrappers", "restore"]

logger = logging.getLogger(__name__)

# A function that returns a wrapper of an SDK method, given the original.
Wrap = Callable[[Any], Any]


def request_wrappers(
    begin: Callable[[Any, Any], Any],
    failed: Callable[[Any, BaseException], None],
    settle: Callable[[Any, Any, bool], None],
) -> tuple[Wrap, Wrap]:
    """Return the wraps of the sync and async `request()` methods.

    `begin(client, options)` returns the call to record, or None for a
    request that is not billable. `failed(call, error)` records the final
    failure, which is then raised to the caller. `settle(call, result,
    stream)` records what the result shows once `request()` returns.
    """

    def sync_request(original: Any) -> Any:
        @functools.wraps(original)
        def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            call = begin(self, options)
            if call is None:
                return original(self, cast_to, options, *args, **kwargs)
            try:
                result = original(self, cast_to, options, *args, **kwargs)
            except BaseException as error:
                failed(call, error)
                raise
            settle(call, result, bool(kwargs.get("stream")))
            return result

        return request

    def async_request(original: Any) -> Any:
        @functools.wraps(original)
        async def request(self: Any, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            call = begin(self, options)
            if call is None:
                return await original(self, cast_to, options, *args, **kwargs)
            try:
                result = await original(self, cast_to, options, *args, **kwargs)
            except BaseException as error:
                failed(call, error)
                raise
            settle(call, result, bool(kwargs.get("stream")))
            return result

        return request

    return sync_request, async_request


def install(targets: list[tuple[type, str, Wrap]], originals: dict[tuple[type, str], Any]) -> None:
    """Replace each `cls.name` with its wrap, keeping the original in `originals`."""
    for cls, name, wrap in targets:
        original = cls.__dict__[name]
        originals[(cls, name)] = original
        setattr(cls, name, wrap(original))


def restore(originals: dict[tuple[type, str], Any]) -> None:
    """Put back every original method that `install` replaced."""
    for (cls, name), original in originals.items():
        setattr(cls, name, original)
    originals.clear()


def on_drop(stream: Any, callback: Callable[[], None]) -> None:
    """Run `callback` when `stream` is garbage collected, unless the interpreter is exiting by then.

    A stream that its caller drops without iterating or closing it runs no
    code of the SDK's, and so none of the hooks', except its collection.
    `callback` must not refer to `stream`, or the stream would never be
    collected.
    """
    try:
        finalizer = weakref.finalize(stream, callback)
    except TypeError:  # an object that takes no weak references
        return
    # At exit the recorder may already have written its queue and stopped.
    finalizer.atexit = False


def observe(tap: Any, event: Any) -> None:
    """Pass one stream event to `tap.observe`, which must never break the caller's stream.

    The SDKs build stream events without validating them, so a malformed
    event can make reading its usage raise. The call is then flagged
    `usage_invalid`, and the event still reaches the caller.
    """
    try:
        tap.observe(event)
    except Exception:
        call = tap.call
        if "usage_invalid" not in call.flags:
            logger.warning(
                "cannot read a %s stream event (model %s); the call is flagged usage_invalid",
                call.provider,
                call.request_model,
                exc_info=True,
            )
            call.flags = call.flags | {"usage_invalid"}
