"""Instrumentation of the `anthropic` SDK (2.x).

Three hooks cover every billable path:

- `SyncAPIClient.request` / `AsyncAPIClient.request`: every resource method
  (`messages.create`, `messages.stream()`, `parse()`, `beta.messages`, raw and
  streaming-response wrappers, Bedrock and Vertex clients) ends here, once per
  logical call, with the SDK's retry loop inside. An exception that escapes
  it is the final failure.
- `Stream.__stream__` / `AsyncStream.__stream__`: the usage of a streamed call
  arrives in its `message_start` and `message_delta` events, after `request()`
  has returned. The call is found through the `httpx2.Response` it shares
  with the stream.
- `JSONLDecoder.__decode__`: Message Batches results, which bypass `request()`
  parsing and carry one usage per succeeded line.

Two smaller hooks close the gaps between them. `Stream.close` and
`AsyncStream.close` record a stream that its caller closes before it ends.
A raw response whose body is still unread when `request()` returns
(`with_streaming_response`, or `with_raw_response` of a stream) gets
per-instance wrappers on `read` and `close`.

These are private SDK attributes; `patch()` checks that they exist and
raises with the supported version range when they do not.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from ..context import AttributionSnapshot, capture
from ..errors import ConfigurationError, UnpricedModelError
from ..events import CostEvent, Status
from ..tracker import Tracker
from ..usage import Usage, merge_anthropic_delta, usage_from_anthropic
from ._hooks import install, observe, on_drop, request_wrappers, restore

__all__ = ["patch", "unpatch"]

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ">=2.17,<3"

_MESSAGE_PATHS = frozenset({"/v1/messages", "/v1/messages?beta=true"})
_CALL_ATTRIBUTE = "_llmcost_call"
_NO_USAGE = Usage()

_tracker: Tracker | None = None
_originals: dict[tuple[type, str], Any] = {}
_provider_by_class: dict[type, str] = {}
# SDK classes that `_settle` checks results against. `patch()` sets them, so
# that the per-call path runs no import statement.
_stream_classes: tuple[type[Any], ...] = ()
_raw_response_classes: tuple[type[Any], ...] = ()


class _Call:
    """One logical Messages API call, from `request()` to its final status."""

    __slots__ = (
        "provider",
        "request_model",
        "attribution",
        "started",
        "finished",
        "tapped",
        "usage",
        "model",
        "response_id",
        "flags",
        "usage_source",
    )

    def __init__(self, provider: str, request_model: str, attribution: AttributionSnapshot) -> None:
        self.provider = provider
        self.request_model = request_model
        self.attribution = attribution
        self.started = time.perf_counter()
        self.finished = False
        # Set once the stream hook runs for this call. From then on, the hook
        # alone decides the final status.
        self.tapped = False
        self.usage: Usage | None = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.flags: frozenset[str] = frozenset()
        self.usage_source: Any = None

    def finish(
        self,
        status: str,
        *,
        error: BaseException | None = None,
        batch: bool = False,
        flags: frozenset[str] = frozenset(),
    ) -> None:
        """Record the call once; later calls are ignored."""
        if self.finished:
            return
        self.finished = True
        tracker = _tracker
        if tracker is None:
            return
        try:
            event = CostEvent(
                provider=self.provider,
                model=self._billed_model(),
                request_model=self.request_model,
                usage=self.usage or _NO_USAGE,
                usage_source=self.usage_source,
                status=status,
                feature=self.attribution.feature,
                user_id=self.attribution.user_id,
                request_id=self.attribution.request_id,
                response_id=self.response_id,
                error_type=type(error).__name__ if error is not None else None,
                latency_ms=(time.perf_counter() - self.started) * 1000,
                context_missing=self.attribution.context_missing,
                batch=batch,
                flags=self.flags | flags,
            )
            tracker.track(event)
        except UnpricedModelError:
            raise
        except Exception:
            logger.exception("recording an Anthropic call failed; the call itself was not affected")

    def _billed_model(self) -> str:
        # First-party responses name the dated model that served the call,
        # which is what is billed. Bedrock and Vertex ids keep the caller's
        # form, since a regional profile can be priced differently.
        if self.provider == "anthropic" and self.model:
            return self.model
        return self.request_model or self.model or "unknown"

    def absorb_message(self, message: Any, *, parse_later: bool = False) -> None:
        """Take usage, id and model from a `Message` object or its JSON dict.

        With `parse_later`, the usage is parsed when the event is priced, off
        the caller's thread. A streamed call parses at once instead, since
        its deltas are merged into the usage as they arrive.
        """
        get = message.get if isinstance(message, dict) else functools.partial(getattr, message)
        self.response_id = get("id", None) or self.response_id
        self.model = get("model", None) or self.model
        usage = get("usage", None)
        if usage is None:
            return
        if parse_later:
            self.usage_source = functools.partial(usage_from_anthropic, usage)
        else:
            self.read_usage(usage_from_anthropic, usage)

    def read_usage(self, parse: Any, *args: Any) -> None:
        """Set `usage` to `parse(*args)`; on TypeError or ValueError, log it and flag `usage_invalid`.

        Raising here would fail the caller's SDK call, or its stream part way.
        """
        try:
            self.usage = parse(*args)
        except (TypeError, ValueError) as exc:
            logger.warning(
                "invalid usage in Anthropic response %s (model %s): %s; its row is flagged usage_invalid",
                self.response_id,
                self.request_model,
                exc,
            )
            self.flags = self.flags | {"usage_invalid"}


def _provider_of(client: Any) -> str:
    cls = type(client)
    provider = _provider_by_class.get(cls)
    if provider is None:
        names = " ".join(base.__name__ for base in cls.__mro__)
        if "Bedrock" in names:
            provider = "aws.bedrock"
        elif "Vertex" in names:
            provider = "gcp.vertex_ai"
        elif "Foundry" in names:
            provider = "azure.ai.foundry"
        else:
            provider = "anthropic"
        _provider_by_class[cls] = provider
    return provider


def _begin(client: Any, options: Any) -> _Call | None:
    if _tracker is None or options.method != "post" or options.url not in _MESSAGE_PATHS:
        return None
    body = options.json_data if isinstance(options.json_data, dict) else {}
    return _Call(_provider_of(client), str(body.get("model") or "unknown"), capture())


def _settle(call: _Call, result: Any, stream: bool) -> None:
    """Record what can be recorded once `request()` has returned."""
    if isinstance(result, _stream_classes):
        setattr(result.response, _CALL_ATTRIBUTE, call)
        on_drop(result, functools.partial(_dropped, call))
        return
    if isinstance(result, _raw_response_classes):
        _settle_raw(call, result.http_response, stream)
        return
    usage = getattr(result, "usage", None)
    if usage is not None:
        call.absorb_message(result, parse_later=True)
        call.finish(Status.OK)
        return
    # NOTE: a response without usage (an SDK middleware returning a cached
    # object of another type) is recorded with empty buckets.
    call.finish(Status.OK)


def _settle_raw(call: _Call, http_response: Any, stream: bool) -> None:
    """Follow a `with_raw_response` or `with_streaming_response` result until its usage is known."""
    # A Stream that the caller's `.parse()` builds on this response finds
    # the call here.
    setattr(http_response, _CALL_ATTRIBUTE, call)
    if not stream and http_response.is_closed:
        # `with_raw_response`: the body was read before `request()` returned.
        _absorb_body(call, http_response)
        return
    # `with_streaming_response`, or `with_raw_response` of a stream: the body
    # is read only if the caller reads it.
    _hook_body(call, http_response, parse_json=not stream)


def _absorb_body(call: _Call, http_response: Any) -> None:
    try:
        call.absorb_message(http_response.json(), parse_later=True)
    except Exception as exc:
        logger.warning("could not read usage from an Anthropic response body: %s", exc)
    call.finish(Status.OK)


def _closed_unparsed(call: _Call, http_response: Any) -> None:
    """Record a raw response closed without a parse that showed its usage."""
    if call.finished or call.tapped:
        return
    # NOTE: a caller that read the raw bytes (`iter_lines()`, `iter_bytes()`)
    # ran the call to completion, but its usage never passed through the SDK.
    # Like a response closed unread, the row is `not_consumed` with an unknown cost.
    call.finish(Status.NOT_CONSUMED)


def _hook_body(call: _Call, http_response: Any, *, parse_json: bool) -> None:
    """Wrap the body methods of one response so that reading or closing it records the call.

    httpx2 closes a response inside `read()`, before the content is stored,
    so the close hooks ignore that inner close and the read hooks record the
    call once the content is there.
    """
    read, aread, close, aclose = (
        http_response.read,
        http_response.aread,
        http_response.close,
        http_response.aclose,
    )
    reading = False

    def read_hook() -> bytes:
        nonlocal reading
        reading = True
        try:
            content = read()
        except BaseException as error:
            call.finish(Status.ERROR, error=error)
            raise
        finally:
            reading = False
        _absorb_body(call, http_response)
        return content

    async def aread_hook() -> bytes:
        nonlocal reading
        reading = True
        try:
            content = await aread()
        except BaseException as error:
            call.finish(Status.ERROR, error=error)
            raise
        finally:
            reading = False
        _absorb_body(call, http_response)
        return content

    def close_hook() -> None:
        close()
        if not reading:
            _closed_unparsed(call, http_response)

    async def aclose_hook() -> None:
        await aclose()
        if not reading:
            _closed_unparsed(call, http_response)

    if parse_json:
        # A streamed body is parsed by the stream hook instead.
        http_response.read = read_hook
        http_response.aread = aread_hook
    http_response.close = close_hook
    http_response.aclose = aclose_hook


def _failed(call: _Call, error: BaseException) -> None:
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("usage"), dict):
        call.read_usage(usage_from_anthropic, body["usage"])
    call.finish(Status.ERROR, error=error)


class _StreamTap:
    """Follows the events of one stream and records the call when it ends."""

    __slots__ = ("call", "saw_stop", "saw_event")

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.saw_stop = False
        self.saw_event = False
        call.tapped = True

    def observe(self, event: Any) -> None:
        self.saw_event = True
        kind = getattr(event, "type", None)
        if kind == "message_start":
            self.call.absorb_message(event.message)
        elif kind == "message_delta":
            delta_usage = getattr(event, "usage", None)
            if delta_usage is not None:
                self.call.read_usage(merge_anthropic_delta, self.call.usage or Usage(), delta_usage)
        elif kind == "message_stop":
            self.saw_stop = True

    def end(self, error: BaseException | None = None) -> None:
        from anthropic import APIStatusError

        if isinstance(error, APIStatusError):
            # An `event: error` frame from the server.
            self.call.finish(Status.ERROR, error=error)
        elif error is not None and not isinstance(error, GeneratorExit):
            # A connection lost mid-stream: tokens were already spent.
            self.call.finish(Status.INCOMPLETE, error=error)
        elif self.saw_stop:
            self.call.finish(Status.OK)
        elif self.saw_event:
            # Closed early by the caller, or cut by the server without a
            # terminal event: the tokens reported so far are recorded.
            self.call.finish(Status.INCOMPLETE)
        else:
            self.call.finish(Status.NOT_CONSUMED)


_sync_request, _async_request = request_wrappers(_begin, _failed, _settle)


def _sync_stream(original: Any) -> Any:
    @functools.wraps(original)
    def __stream__(self: Any) -> Any:
        call = getattr(self.response, _CALL_ATTRIBUTE, None)
        if call is None:
            yield from original(self)
            return
        tap = _StreamTap(call)
        inner = original(self)
        try:
            for event in inner:
                observe(tap, event)
                yield event
        except BaseException as error:
            inner.close()
            tap.end(error)
            raise
        tap.end()

    return __stream__


def _async_stream(original: Any) -> Any:
    @functools.wraps(original)
    async def __stream__(self: Any) -> Any:
        call = getattr(self.response, _CALL_ATTRIBUTE, None)
        if call is None:
            async for event in original(self):
                yield event
            return
        tap = _StreamTap(call)
        inner = original(self)
        try:
            async for event in inner:
                observe(tap, event)
                yield event
        except BaseException as error:
            await inner.aclose()
            tap.end(error)
            raise
        tap.end()

    return __stream__


def _dropped(call: _Call) -> None:
    """Record a stream that its caller dropped without iterating or closing it."""
    # One that was iterated is recorded by its stream hook, when Python
    # closes the suspended generator.
    if not call.finished and not call.tapped:
        call.finish(Status.NOT_CONSUMED)


def _closed_by_caller(stream: Any) -> None:
    """Record a stream that its caller closed before it ended.

    A stream never iterated has no generator, so the stream hook cannot see
    it. One iterated part way is recorded now rather than when its suspended
    generator is garbage collected.
    """
    call = getattr(stream.response, _CALL_ATTRIBUTE, None)
    if call is None or call.finished:
        return
    if call.tapped and call.usage is not None:
        call.finish(Status.INCOMPLETE)
    else:
        call.finish(Status.NOT_CONSUMED)


def _sync_close(original: Any) -> Any:
    @functools.wraps(original)
    def close(self: Any) -> None:
        original(self)
        _closed_by_caller(self)

    return close


def _async_close(original: Any) -> Any:
    @functools.wraps(original)
    async def close(self: Any) -> None:
        await original(self)
        _closed_by_caller(self)

    return close


def _batch_line(decoder: Any, line: Any) -> None:
    result = getattr(line, "result", None)
    custom_id = getattr(line, "custom_id", None)
    if result is None or custom_id is None or getattr(result, "type", None) != "succeeded":
        return
    message = result.message
    batch_id = _batch_id(decoder.http_response)
    call = _Call("anthropic", str(getattr(message, "model", "unknown")), capture())
    call.absorb_message(message, parse_later=True)
    # Message ids are unique across batches; the batch and custom id pair is
    # the fallback key for a line that carries none.
    call.response_id = call.response_id or f"{batch_id}/{custom_id}"
    call.started = time.perf_counter()
    call.finish(Status.OK, batch=True)


def _batch_id(http_response: Any) -> str:
    parts = [part for part in str(http_response.url.path).split("/") if part]
    if "batches" in parts:
        index = parts.index("batches")
        if index + 1 < len(parts):
            return parts[index + 1]
    return "batch"


def _sync_decode(original: Any) -> Any:
    @functools.wraps(original)
    def __decode__(self: Any) -> Any:
        for line in original(self):
            try:
                _batch_line(self, line)
            except UnpricedModelError:
                raise
            except Exception:
                logger.exception("recording a Message Batches result failed")
            yield line

    return __decode__


def _async_decode(original: Any) -> Any:
    @functools.wraps(original)
    async def __decode__(self: Any) -> Any:
        async for line in original(self):
            try:
                _batch_line(self, line)
            except UnpricedModelError:
                raise
            except Exception:
                logger.exception("recording a Message Batches result failed")
            yield line

    return __decode__


def _targets() -> list[tuple[type, str, Any]]:
    try:
        import anthropic
        from anthropic import _base_client, _streaming
        from anthropic._decoders import jsonl
    except ImportError as exc:
        raise ConfigurationError(
            f"the anthropic SDK is not importable ({exc}); install it with `pip install 'anthropic{SUPPORTED_VERSIONS}'`"
        ) from exc
    targets = [
        (_base_client.SyncAPIClient, "request", _sync_request),
        (_base_client.AsyncAPIClient, "request", _async_request),
        (_streaming.Stream, "__stream__", _sync_stream),
        (_streaming.AsyncStream, "__stream__", _async_stream),
        (_streaming.Stream, "close", _sync_close),
        (_streaming.AsyncStream, "close", _async_close),
        (jsonl.JSONLDecoder, "__decode__", _sync_decode),
        (jsonl.AsyncJSONLDecoder, "__decode__", _async_decode),
    ]
    missing = [f"{cls.__name__}.{name}" for cls, name, _ in targets if name not in cls.__dict__]
    if missing:
        raise ConfigurationError(
            f"anthropic {anthropic.__version__} lacks {', '.join(missing)}, so its calls cannot be recorded; "
            f"install a supported version: pip install 'anthropic{SUPPORTED_VERSIONS}'"
        )
    return targets


def patch(tracker: Tracker) -> None:
    """Patch the SDK classes once; later calls only switch the tracker."""
    global _tracker, _stream_classes, _raw_response_classes
    _tracker = tracker
    if _originals:
        return
    targets = _targets()
    from anthropic import AsyncStream, Stream
    from anthropic._response import BaseAPIResponse

    _stream_classes = (Stream, AsyncStream)
    _raw_response_classes = (BaseAPIResponse,)
    install(targets, _originals)


def unpatch() -> None:
    """Restore the SDK's own methods."""
    global _tracker
    restore(_originals)
    _tracker = None
