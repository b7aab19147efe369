"""Instrumentation of the `openai` SDK (3.x).

Two hooks cover every billable path:

- `SyncAPIClient.request` / `AsyncAPIClient.request`: every resource method
  (`chat.completions.create`, `.parse()`, `.stream()`, `responses.create`,
  `embeddings.create`, `completions.create`, the raw and streaming-response
  wrappers, `AzureOpenAI`) ends here, once per logical call, with the SDK's
  retry loop inside. An exception that escapes it is the final failure.
- `Stream.__stream__` / `AsyncStream.__stream__`: a streamed call reports
  its usage in its last chunk (chat and legacy completions, only with
  `stream_options={"include_usage": True}`) or in the terminal
  `response.completed`, `response.incomplete` or `response.failed` event
  (Responses API), after `request()` has returned. The call is found through
  the `httpx2.Response` that it shares with the stream.

A streamed or still unread response also gets per-instance wrappers on its
`close` and `aclose` (and `read` and `aread` when its JSON body is unread).
The SDK's `.stream()` helpers close the HTTP response directly rather than
through `Stream.close`, so these wrappers are what records a stream closed
early or never read.

These are private SDK attributes; `patch()` checks the SDK version and that
they exist, and raises with the supported version range otherwise.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any

from ..context import AttributionSnapshot, capture
from ..errors import ConfigurationError, UnpricedModelError
from ..events import CostEvent, Status
from ..tracker import Tracker
from ..usage import Usage, usage_from_openai
from ._hooks import install, observe, on_drop, request_wrappers, restore

__all__ = ["SUPPORTED_VERSIONS", "patch", "unpatch"]

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ">=3.60,<4"
_MIN_VERSION = (3, 60)
_MAX_MAJOR = 4

# POST paths of billable calls, with the Azure deployment form
# (`/deployments/{name}/chat/completions`) and any query string.
# `/responses/input_tokens` (a free token count), `/responses/{id}/cancel`
# and the GETs of stored responses do not match.
_BILLABLE_PATH = re.compile(
    r"^(?:/openai)?(?:/deployments/[^/?]+)?/(?:chat/completions|responses|embeddings|completions)(?:\?.*)?$"
)
_CALL_ATTRIBUTE = "_llmcost_call"
_USAGE_UNKNOWN = frozenset({"usage_unknown"})
_NO_USAGE = Usage()
# The `object` of chat and legacy completions stream chunks.
_CHUNK_OBJECTS = frozenset({"chat.completion.chunk", "text_completion"})
# Terminal events of a Responses API stream, and the status each one records.
_RESPONSE_TERMINAL = {
    "response.completed": Status.OK,
    "response.incomplete": Status.OK,
    "response.failed": Status.ERROR,
}

_tracker: Tracker | None = None
_originals: dict[tuple[type, str], Any] = {}
_provider_by_class: dict[type, str] = {}
# SDK classes that `_settle` checks results against. `patch()` sets them, so
# that the per-call path runs no import statement.
_stream_classes: tuple[type[Any], ...] = ()
_raw_response_classes: tuple[type[Any], ...] = ()
_api_error_class: type[BaseException] | None = None
_connection_error_classes: tuple[type[BaseException], ...] = ()


class _Call:
    """One logical billable call, from `request()` to its final status."""

    __slots__ = (
        "provider",
        "request_model",
        "attribution",
        "started",
        "finished",
        "tap",
        "usage",
        "usage_source",
        "model",
        "response_id",
        "flags",
    )

    def __init__(self, provider: str, request_model: str, attribution: AttributionSnapshot) -> None:
        self.provider = provider
        self.request_model = request_model
        self.attribution = attribution
        self.started = time.perf_counter()
        self.finished = False
        # Set once the stream hook runs for this call. From then on, the tap
        # decides the final status, unless the caller closes the stream while
        # it is suspended between two events.
        self.tap: _StreamTap | None = None
        self.usage: Usage | None = None
        self.usage_source: Any = None
        self.model: str | None = None
        self.response_id: str | None = None
        self.flags: frozenset[str] = frozenset()

    @property
    def has_usage(self) -> bool:
        return self.usage is not None or self.usage_source is not None or "usage_invalid" in self.flags

    def finish(
        self,
        status: str,
        *,
        error: BaseException | None = None,
        error_type: str | None = None,
        flags: frozenset[str] = frozenset(),
    ) -> None:
        """Record the call once; later calls are ignored."""
        if self.finished:
            return
        self.finished = True
        tracker = _tracker
        if tracker is None:
            return
        if error is not None and error_type is None:
            error_type = type(error).__name__
        try:
            event = CostEvent(
                provider=self.provider,
                model=self.model or self.request_model or "unknown",
                request_model=self.request_model,
                usage=self.usage or _NO_USAGE,
                usage_source=self.usage_source,
                status=status,
                feature=self.attribution.feature,
                user_id=self.attribution.user_id,
                request_id=self.attribution.request_id,
                response_id=self.response_id,
                error_type=error_type,
                latency_ms=(time.perf_counter() - self.started) * 1000,
                context_missing=self.attribution.context_missing,
                flags=self.flags | flags,
            )
            tracker.track(event)
        except UnpricedModelError:
            raise
        except Exception:
            logger.exception("recording an OpenAI call failed; the call itself was not affected")

    def absorb(self, result: Any, *, parse_later: bool = False) -> None:
        """Take usage, id and model from a response object or its JSON dict.

        The response's `model` is what is billed: on Azure the request's
        `model` is a deployment name. With `parse_later`, the usage is parsed
        when the event is priced, off the caller's thread.
        """
        get = result.get if isinstance(result, dict) else functools.partial(getattr, result)
        self.response_id = get("id", None) or self.response_id
        model = get("model", None)
        if isinstance(model, str) and model:
            self.model = model
        usage = get("usage", None)
        if usage is None:
            return
        if parse_later:
            self.usage_source = functools.partial(usage_from_openai, usage)
        else:
            self.read_usage(usage)

    def read_usage(self, usage: Any) -> None:
        """Parse `usage` now; on TypeError or ValueError, log it and flag `usage_invalid`.

        Raising here would fail the caller's stream part way.
        """
        try:
            self.usage = usage_from_openai(usage)
        except (TypeError, ValueError) as exc:
            logger.warning(
                "invalid usage in OpenAI response %s (model %s): %s; its row is flagged usage_invalid",
                self.response_id,
                self.request_model,
                exc,
            )
            self.flags = self.flags | {"usage_invalid"}

    def unknown_usage_flags(self) -> frozenset[str]:
        """Return `usage_unknown` when no usage was seen, so that the row is not priced at $0."""
        return frozenset() if self.has_usage else _USAGE_UNKNOWN


def _provider_of(client: Any) -> str:
    cls = type(client)
    provider = _provider_by_class.get(cls)
    if provider is None:
        names = " ".join(base.__name__ for base in cls.__mro__)
        if "Azure" in names:
            provider = "azure.openai"
        elif "Bedrock" in names:
            provider = "aws.bedrock"
        else:
            provider = "openai"
        _provider_by_class[cls] = provider
    return provider


def _begin(client: Any, options: Any) -> _Call | None:
    if _tracker is None or options.method != "post" or not _BILLABLE_PATH.match(options.url):
        return None
    body = options.json_data if isinstance(options.json_data, dict) else {}
    # Azure sends the deployment name as `model`; the response names the model.
    return _Call(_provider_of(client), str(body.get("model") or "unknown"), capture())


def _settle(call: _Call, result: Any, stream: bool) -> None:
    """Record what can be recorded once `request()` has returned."""
    if isinstance(result, _stream_classes):
        setattr(result.response, _CALL_ATTRIBUTE, call)
        _hook_close(call, result.response)
        on_drop(result, functools.partial(_dropped, call))
        return
    if isinstance(result, _raw_response_classes):
        _settle_raw(call, result.http_response, stream)
        return
    call.absorb(result, parse_later=True)
    # NOTE: a `background=True` response is returned queued, without usage.
    # Its tokens are billed when it completes, which only a later GET
    # (`responses.retrieve`) shows, and GETs are not recorded. The row is
    # written with empty buckets, flagged `usage_unknown` and left unpriced.
    call.finish(Status.OK, flags=call.unknown_usage_flags())


def _dropped(call: _Call) -> None:
    """Record a stream that its caller dropped without iterating or closing it."""
    # One that was iterated is recorded by its stream hook, when Python
    # closes the suspended generator.
    if not call.finished and call.tap is None:
        call.finish(Status.NOT_CONSUMED)


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
    if not stream:
        _hook_read(call, http_response)
    _hook_close(call, http_response)


def _absorb_body(call: _Call, http_response: Any) -> None:
    try:
        call.absorb(http_response.json(), parse_later=True)
    except Exception as exc:
        logger.warning("could not read usage from an OpenAI response body: %s", exc)
    call.finish(Status.OK, flags=call.unknown_usage_flags())


def _closed(call: _Call, http_response: Any) -> None:
    """Record a call whose HTTP response was closed before a stream or parse recorded it."""
    if call.finished:
        return
    tap = call.tap
    if tap is not None:
        if tap.inside:
            # The stream hook is closing the response itself and decides.
            return
        if tap.terminal_status is not None and call.has_usage:
            # The caller left right after the last event: the call is complete.
            call.finish(tap.terminal_status, error_type=tap.terminal_error, flags=call.unknown_usage_flags())
            return
        # The caller closed a stream part way: the tokens reported so far
        # are recorded, and a chat stream has reported none yet.
        call.finish(Status.INCOMPLETE, flags=call.unknown_usage_flags())
    else:
        # NOTE: a caller that read the raw bytes (`iter_lines()`) ran the call
        # to completion, but its usage never passed through the SDK. Like a
        # response closed unread, the row is `not_consumed` with an unknown cost.
        call.finish(Status.NOT_CONSUMED)


def _hook_read(call: _Call, http_response: Any) -> None:
    """Wrap `read` and `aread` of one response, so that parsing its JSON body records the call.

    httpx2 closes a response inside `read()`, before the content is stored,
    so the close hook ignores that inner close, and the read hook records
    the call once the content is there.
    """
    read, aread = http_response.read, http_response.aread

    def read_hook() -> bytes:
        http_response._llmcost_reading = True
        try:
            content = read()
        except BaseException as error:
            call.finish(Status.ERROR, error=error)
            raise
        finally:
            http_response._llmcost_reading = False
        _absorb_body(call, http_response)
        return content

    async def aread_hook() -> bytes:
        http_response._llmcost_reading = True
        try:
            content = await aread()
        except BaseException as error:
            call.finish(Status.ERROR, error=error)
            raise
        finally:
            http_response._llmcost_reading = False
        _absorb_body(call, http_response)
        return content

    http_response.read = read_hook
    http_response.aread = aread_hook


def _hook_close(call: _Call, http_response: Any) -> None:
    """Wrap `close` and `aclose` of one response, so that closing it early records the call."""
    close, aclose = http_response.close, http_response.aclose

    def close_hook() -> None:
        close()
        if not getattr(http_response, "_llmcost_reading", False):
            _closed(call, http_response)

    async def aclose_hook() -> None:
        await aclose()
        if not getattr(http_response, "_llmcost_reading", False):
            _closed(call, http_response)

    http_response.close = close_hook
    http_response.aclose = aclose_hook


def _failed(call: _Call, error: BaseException) -> None:
    # `parse()` raises LengthFinishReasonError (and the like) after a 200
    # reply that was billed; the error carries that completion and its usage.
    completion = getattr(error, "completion", None)
    if completion is not None and getattr(completion, "usage", None) is not None:
        call.absorb(completion, parse_later=True)
    call.finish(Status.ERROR, error=error)


class _StreamTap:
    """Follows the events of one stream and records the call when it ends."""

    __slots__ = ("call", "saw_event", "terminal_status", "terminal_error", "inside")

    def __init__(self, call: _Call) -> None:
        self.call = call
        self.saw_event = False
        # The status that the stream's last event implies, once it is seen.
        self.terminal_status: str | None = None
        self.terminal_error: str | None = None
        # True while the stream hook runs, False while the stream is
        # suspended in the caller's hands between two events.
        self.inside = True
        call.tap = self

    def observe(self, event: Any) -> None:
        self.saw_event = True
        call = self.call
        kind = getattr(event, "type", None)
        # Chat and legacy completions chunks name their `object`; a server
        # may add a `type` field to them, which Responses events use.
        if kind is not None and getattr(event, "object", None) not in _CHUNK_OBJECTS:
            self._observe_response_event(kind, event)
            return
        # A chat or legacy completions chunk.
        if call.response_id is None:
            call.absorb(event)
        choices = getattr(event, "choices", None) or ()
        if any(getattr(choice, "finish_reason", None) for choice in choices):
            self.terminal_status = Status.OK
        usage = getattr(event, "usage", None)
        if usage is not None:
            call.absorb(event)
            self.terminal_status = Status.OK

    def _observe_response_event(self, kind: str, event: Any) -> None:
        response = getattr(event, "response", None)
        if kind == "response.created" and response is not None:
            self.call.absorb(response)
        elif kind in _RESPONSE_TERMINAL and response is not None:
            self.call.absorb(response)
            self.terminal_status = _RESPONSE_TERMINAL[kind]
            if kind == "response.failed":
                self.terminal_error = "ResponseFailed"
            elif kind == "response.incomplete":
                self.call.flags = self.call.flags | {"response_incomplete"}
        elif kind == "error":
            self.terminal_status = Status.ERROR
            self.terminal_error = "ResponseStreamError"

    def end(self, error: BaseException | None = None) -> None:
        call = self.call
        flags = call.unknown_usage_flags()
        if isinstance(error, _connection_error_classes):
            # A connection lost or timed out mid-stream, which the SDK wraps
            # in APIConnectionError: tokens were already spent.
            call.finish(Status.INCOMPLETE, error=error, flags=flags)
        elif _api_error_class is not None and isinstance(error, _api_error_class):
            # An error payload from the server, which the SDK raises.
            call.finish(Status.ERROR, error=error, flags=flags)
        elif error is not None and not isinstance(error, GeneratorExit):
            # A connection lost mid-stream: tokens were already spent.
            call.finish(Status.INCOMPLETE, error=error, flags=flags)
        elif error is None and self.terminal_status is not None:
            call.finish(self.terminal_status, error_type=self.terminal_error, flags=flags)
        elif self.saw_event:
            # Closed early by the caller, or cut by the server before its
            # last event: the tokens reported so far are recorded.
            call.finish(Status.INCOMPLETE, flags=flags)
        else:
            call.finish(Status.NOT_CONSUMED)


_sync_request, _async_request = request_wrappers(_begin, _failed, _settle)


def _sync_stream(original: Any) -> Any:
    @functools.wraps(original)
    def __stream__(self: Any) -> Any:
        call = getattr(self.response, _CALL_ATTRIBUTE, None)
        if call is None or call.finished:
            yield from original(self)
            return
        tap = _StreamTap(call)
        inner = original(self)
        try:
            for event in inner:
                observe(tap, event)
                tap.inside = False
                try:
                    yield event
                finally:
                    tap.inside = True
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
        if call is None or call.finished:
            async for event in original(self):
                yield event
            return
        tap = _StreamTap(call)
        inner = original(self)
        try:
            async for event in inner:
                observe(tap, event)
                tap.inside = False
                try:
                    yield event
                finally:
                    tap.inside = True
        except BaseException as error:
            await inner.aclose()
            tap.end(error)
            raise
        tap.end()

    return __stream__


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split(".")[:2]:
        digits = re.match(r"\d+", part)
        parts.append(int(digits.group()) if digits else 0)
    return tuple(parts)


def _targets() -> list[tuple[type, str, Any]]:
    try:
        import openai
        from openai import _base_client, _streaming
    except ImportError as exc:
        raise ConfigurationError(
            f"the openai SDK is not importable ({exc}); "
            f"install it with `pip install 'openai{SUPPORTED_VERSIONS}'`"
        ) from exc
    version = _version_tuple(openai.__version__)
    if version < _MIN_VERSION or version[0] >= _MAX_MAJOR:
        raise ConfigurationError(
            f"openai {openai.__version__} is not supported, so its calls cannot be recorded; "
            f"install a supported version: pip install 'openai{SUPPORTED_VERSIONS}'"
        )
    targets = [
        (_base_client.SyncAPIClient, "request", _sync_request),
        (_base_client.AsyncAPIClient, "request", _async_request),
        (_streaming.Stream, "__stream__", _sync_stream),
        (_streaming.AsyncStream, "__stream__", _async_stream),
    ]
    missing = [f"{cls.__name__}.{name}" for cls, name, _ in targets if name not in cls.__dict__]
    if missing:
        raise ConfigurationError(
            f"openai {openai.__version__} lacks {', '.join(missing)}, so its calls cannot be recorded; "
            f"install a supported version: pip install 'openai{SUPPORTED_VERSIONS}'"
        )
    return targets


def patch(tracker: Tracker) -> None:
    """Patch the SDK classes once; later calls only switch the tracker."""
    global _tracker, _stream_classes, _raw_response_classes, _api_error_class, _connection_error_classes
    if _originals:
        _tracker = tracker
        return
    targets = _targets()
    from openai import APIConnectionError, APIError, AsyncStream, Stream
    from openai._legacy_response import LegacyAPIResponse
    from openai._response import BaseAPIResponse

    _stream_classes = (Stream, AsyncStream)
    # `with_raw_response` returns a LegacyAPIResponse, which does not derive
    # from BaseAPIResponse; `with_streaming_response` returns an APIResponse.
    _raw_response_classes = (BaseAPIResponse, LegacyAPIResponse)
    _api_error_class = APIError
    _connection_error_classes = (APIConnectionError,)
    install(targets, _originals)
    _tracker = tracker


def unpatch() -> None:
    """Restore the SDK's own methods."""
    global _tracker
    restore(_originals)
    _tracker = None
