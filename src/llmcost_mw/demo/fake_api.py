"""Local stand-in for the Anthropic Messages API, for tests and the offline demo.

`FakeAnthropicAPI` serves on 127.0.0.1 from a daemon thread and speaks enough of the
wire protocol for the real `anthropic` SDK (checked with 2.17.0) to run against it
through `base_url=`. It uses only the standard library.

Endpoints:

* ``POST /v1/messages``: a JSON message, or SSE events when the body has ``"stream": true``.
* ``POST /v1/messages/count_tokens``: ``{"input_tokens": N}``.
* ``POST /v1/messages/batches``, ``GET /v1/messages/batches``,
  ``GET /v1/messages/batches/{id}`` and ``GET /v1/messages/batches/{id}/results`` (JSONL).
  Batches end at once, so the first retrieve already has ``processing_status: "ended"``.
* Bedrock (``AnthropicBedrock``): ``POST /model/{model}/invoke`` and
  ``POST /model/{model}/invoke-with-response-stream``, which sends AWS event-stream frames.
* Vertex (``AnthropicVertex``):
  ``POST /projects/{p}/locations/{r}/publishers/anthropic/models/{model}:rawPredict``,
  ``:streamRawPredict``, and ``models/count-tokens:rawPredict``.
* Any other path returns a 404 error in the Anthropic error shape.

Without a script, replies are deterministic so that the demo prints stable numbers:

* ``input_tokens`` is an estimate of the uncached prompt: its characters // 4, at least 1.
  The prompt is the system text, the message contents and the tool definitions.
* ``output_tokens`` is between 20 and 80 and derived from a CRC32 of the prompt. It is capped
  at ``max_tokens``, and then ``stop_reason`` is ``"max_tokens"``.
* ``system`` blocks up to the last block with ``cache_control`` form a cached prefix. The
  first request with a given model and prefix reports it as ``cache_creation_input_tokens``,
  split by each breakpoint's ``ttl`` into ``ephemeral_5m_input_tokens`` and
  ``ephemeral_1h_input_tokens``. Later requests report it as ``cache_read_input_tokens``.
* Tool-use loop: a request with ``tools`` whose messages contain fewer than two
  ``tool_result`` blocks gets ``stop_reason: "tool_use"`` and one ``tool_use`` block that
  calls the first tool. After that the reply is text with ``stop_reason: "end_turn"``.

Model-name suffixes select failure modes (on every platform):

* ``-overloaded-once``: 529 ``overloaded_error`` when the ``x-stainless-retry-count`` request
  header is 0 or missing, so the first attempt fails and the SDK's retry succeeds.
* ``-always-500``: 500 ``api_error`` on every attempt.
* ``-bad-request``: 400 ``invalid_request_error``.
* ``-cut-stream``: a stream ends after ``message_start`` and a few content deltas, with no
  ``message_delta`` or ``message_stop``. Non-streaming requests succeed.
* ``-sse-error``: a stream sends an ``error`` event after ``message_start``.
  Non-streaming requests succeed.

In a message batch, ``-bad-request`` and ``-always-500`` produce ``errored`` result lines
and every other model produces a ``succeeded`` line.

`FakeAnthropicAPI.enqueue` scripts the next messages request (on any platform) with a
`Reply`, which takes precedence over the defaults and the suffixes above.
`FakeAnthropicAPI.set_model_usage` fixes the usage that a model reports.

Retryable errors (408, 409, 429 and 5xx) carry ``x-should-retry: true`` and
``retry-after-ms`` (1 by default). anthropic 2.17.0 waits for ``retry-after-ms`` in place of
its exponential backoff, so retries in tests take about a millisecond.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import logging
import socket
import struct
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

__all__ = ["FakeAnthropicAPI", "RecordedRequest", "Reply"]

logger = logging.getLogger(__name__)

# The SDK sends this header on every attempt: 0 for the first, 1 for the first retry.
RETRY_COUNT_HEADER = "x-stainless-retry-count"

CHARS_PER_TOKEN = 4
MIN_DEFAULT_OUTPUT_TOKENS = 20
DEFAULT_OUTPUT_TOKENS_SPREAD = 61
# The loop ends once the conversation contains this many tool_result blocks.
TOOL_RESULTS_BEFORE_END_TURN = 2

FILLER_SENTENCE = "This is a deterministic reply from the local fake Anthropic API. "

DEFAULT_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# NOTE: non-streaming Bedrock errors use the Anthropic error body here, not Bedrock's own
# {"message": ...} shape, so code that parses Bedrock error bodies is not exercised.
# Bedrock reports stream errors as event-stream exception frames whose `:exception-type`
# must name a member of the bedrock-runtime `ResponseStream` shape for botocore to parse it.
BEDROCK_EXCEPTION_TYPES = {
    "overloaded_error": "serviceUnavailableException",
    "rate_limit_error": "throttlingException",
    "invalid_request_error": "validationException",
    "api_error": "internalServerException",
}
BEDROCK_DEFAULT_EXCEPTION_TYPE = "modelStreamErrorException"


@dataclass
class Reply:
    """One scripted reply to a messages request.

    `usage` is reported verbatim in the JSON body, and in ``message_start`` when streaming.
    When it is None, the usage is derived from the request as for an unscripted call.
    `delta_usage` is the cumulative usage in ``message_delta`` and defaults to
    ``{"output_tokens": usage["output_tokens"]}``. A status of 400 or higher sends an error
    body with `error_type` (by default chosen from the status) and `error_message`.
    `headers` are extra response headers.
    """

    usage: dict | None = None
    stop_reason: str | None = "end_turn"
    content: list[dict] | None = None
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    model: str | None = None
    id: str | None = None
    delta_usage: dict | None = None
    cut_before_delta: bool = False
    sse_error_after_start: bool = False
    delay_seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    """One HTTP request as the server received it.

    `headers` has lower-case names. `body` is the parsed JSON body, or None when the body
    was empty or not valid JSON. `model` is the model id from the body or, for Bedrock and
    Vertex, from the URL.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    model: str | None = None


@dataclass
class _Plan:
    """A reply with every field resolved, ready to encode for one platform."""

    reply: Reply
    message: dict | None = None
    start_usage: dict | None = None
    delta_usage: dict | None = None


class _RequestError(Exception):
    """An invalid request, reported to the client as a 400 ``invalid_request_error``."""


# ---------------------------------------------------------------------------
# Token estimates and default replies
# ---------------------------------------------------------------------------


def _estimate_tokens(characters: int) -> int:
    return characters // CHARS_PER_TOKEN


def _block_text(block: Any) -> str:
    """Return the text of one content block that counts toward the token estimate.

    Blocks without a text form (images, documents) count with their JSON size.
    """
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return json.dumps(block, sort_keys=True)

    block_type = block.get("type")
    if block_type == "text":
        return str(block.get("text", ""))
    if block_type == "tool_result":
        return _content_text(block.get("content", ""))
    if block_type == "tool_use":
        return str(block.get("name", "")) + json.dumps(block.get("input", {}), sort_keys=True)
    if block_type == "thinking":
        return str(block.get("thinking", ""))
    return json.dumps(block, sort_keys=True)


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(_block_text(block) for block in content)
    return _block_text(content)


def _system_blocks(system: Any) -> list[dict]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"type": "text", "text": system}]
    if isinstance(system, list):
        return [block for block in system if isinstance(block, dict)]
    raise _RequestError("system: expected a string or a list of content blocks")


def _validate_messages(body: Any, *, require_max_tokens: bool) -> None:
    if not isinstance(body, dict):
        raise _RequestError("request body: expected a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RequestError("messages: expected a non-empty list")
    if require_max_tokens:
        max_tokens = body.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _RequestError("max_tokens: expected an integer of at least 1")


class _PromptSummary:
    """Character counts and the cacheable system prefix of one messages request."""

    def __init__(self, body: dict) -> None:
        system_blocks = _system_blocks(body.get("system"))
        messages_text = "".join(
            _content_text(message.get("content")) for message in body["messages"] if isinstance(message, dict)
        )
        tools = body.get("tools") or []
        tools_text = json.dumps(tools, sort_keys=True) if tools else ""
        system_text = "".join(_block_text(block) for block in system_blocks)

        self.total_characters = len(system_text) + len(messages_text) + len(tools_text)
        self.fingerprint = binascii.crc32((system_text + messages_text + tools_text).encode("utf-8"))

        # Segments of the system prompt that end at a cache breakpoint, with that breakpoint's TTL.
        self.cached_prefix = ""
        self.cached_segments: list[tuple[str, int]] = []
        pending = ""
        for block in system_blocks:
            pending += _block_text(block)
            cache_control = block.get("cache_control")
            if isinstance(cache_control, dict):
                ttl = "1h" if cache_control.get("ttl") == "1h" else "5m"
                self.cached_segments.append((ttl, _estimate_tokens(len(pending))))
                self.cached_prefix += pending
                pending = ""

    @property
    def uncached_input_tokens(self) -> int:
        return max(1, _estimate_tokens(self.total_characters - len(self.cached_prefix)))

    @property
    def all_input_tokens(self) -> int:
        return max(1, _estimate_tokens(self.total_characters))


def _default_output_tokens(summary: _PromptSummary) -> int:
    return MIN_DEFAULT_OUTPUT_TOKENS + summary.fingerprint % DEFAULT_OUTPUT_TOKENS_SPREAD


def _filler_text(output_tokens: int) -> str:
    """Return text of about `output_tokens` tokens under the characters // 4 estimate."""
    length = max(1, output_tokens * CHARS_PER_TOKEN)
    repeats = length // len(FILLER_SENTENCE) + 1
    return (FILLER_SENTENCE * repeats)[:length].rstrip() or "."


def _example_tool_input(tool: dict) -> dict:
    """Build a small input for `tool` from the property types in its JSON schema."""
    schema = tool.get("input_schema")
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict):
        return {}

    example_values = {"string": "demo", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}
    tool_input = {}
    for name, property_schema in list(properties.items())[:3]:
        property_type = property_schema.get("type") if isinstance(property_schema, dict) else None
        tool_input[name] = example_values.get(property_type, "demo")
    return tool_input


def _count_tool_results(messages: list) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(1 for block in content if isinstance(block, dict) and block.get("type") == "tool_result")
    return count


def _wants_tool_call(body: dict) -> bool:
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return False
    tool_choice = body.get("tool_choice")
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "none":
        return False
    return _count_tool_results(body["messages"]) < TOOL_RESULTS_BEFORE_END_TURN


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _utc_timestamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _error_body(error_type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": _new_id("req_")}


def _error_reply(status: int, message: str, error_type: str | None = None) -> Reply:
    return Reply(status=status, error_type=error_type, error_message=message)


def _suffix_failure(model: str, retry_count: int) -> Reply | None:
    """Return the error reply that a failure-mode suffix of `model` selects, if any."""
    if model.endswith("-overloaded-once") and retry_count == 0:
        return _error_reply(529, "Overloaded (fake: first attempt only)", "overloaded_error")
    if model.endswith("-always-500"):
        return _error_reply(500, "Internal server error (fake: every attempt)", "api_error")
    if model.endswith("-bad-request"):
        return _error_reply(400, f"model: {model!r} is rejected by the fake API", "invalid_request_error")
    return None


# ---------------------------------------------------------------------------
# Stream events and wire encodings
# ---------------------------------------------------------------------------


def _split_evenly(text: str, parts: int) -> list[str]:
    if not text:
        return [""]
    size = max(1, -(-len(text) // parts))
    return [text[start : start + size] for start in range(0, len(text), size)]


def _block_events(index: int, block: dict) -> tuple[dict, list[dict]]:
    """Return the ``content_block_start`` event and the delta events for one content block."""
    block_type = block.get("type")
    if block_type == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": chunk} for chunk in _split_evenly(str(block.get("text", "")), 3)]
    elif block_type == "tool_use":
        start = {"type": "tool_use", "id": block.get("id"), "name": block.get("name"), "input": {}}
        partial_json = json.dumps(block.get("input", {}))
        deltas = [{"type": "input_json_delta", "partial_json": chunk} for chunk in _split_evenly(partial_json, 3)]
    elif block_type == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        thinking_chunks = _split_evenly(str(block.get("thinking", "")), 2)
        deltas = [{"type": "thinking_delta", "thinking": chunk} for chunk in thinking_chunks]
        deltas.append({"type": "signature_delta", "signature": block.get("signature", "fake-signature")})
    else:
        # Other block types have no delta form here, so the start event carries the whole block.
        start, deltas = block, []

    start_event = {"type": "content_block_start", "index": index, "content_block": start}
    delta_events = [{"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas]
    return start_event, delta_events


def _stream_events(plan: _Plan) -> Iterator[tuple[str, dict]]:
    """Yield ``(event type, data)`` pairs for a streamed reply, stopping early when cut."""
    reply, message = plan.reply, plan.message
    assert message is not None

    start_message = dict(message, content=[], stop_reason=None, stop_sequence=None, usage=plan.start_usage)
    yield "message_start", {"type": "message_start", "message": start_message}
    yield "ping", {"type": "ping"}

    if reply.sse_error_after_start:
        error_type = reply.error_type or "overloaded_error"
        yield "error", _error_body(error_type, reply.error_message or "Overloaded (fake stream error)")
        return

    for index, block in enumerate(message["content"]):
        start_event, delta_events = _block_events(index, block)
        yield "content_block_start", start_event
        if reply.cut_before_delta:
            for delta_event in delta_events[:2]:
                yield "content_block_delta", delta_event
            return
        for delta_event in delta_events:
            yield "content_block_delta", delta_event
        yield "content_block_stop", {"type": "content_block_stop", "index": index}

    if reply.cut_before_delta:
        return

    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message.get("stop_sequence")}
    yield "message_delta", {"type": "message_delta", "delta": delta, "usage": plan.delta_usage}
    yield "message_stop", {"type": "message_stop"}


def encode_sse(event_type: str, data: dict) -> bytes:
    """Encode one server-sent event. The SDK drops frames without an ``event:`` line."""
    return f"event: {event_type}\ndata: {json.dumps(data)}\n\n".encode("utf-8")


def _eventstream_header(name: str, value: str) -> bytes:
    name_bytes = name.encode("utf-8")
    value_bytes = value.encode("utf-8")
    # Header value type 7 is a string with a 2-byte length.
    return struct.pack("!B", len(name_bytes)) + name_bytes + struct.pack("!BH", 7, len(value_bytes)) + value_bytes


def encode_eventstream_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """Encode one AWS event-stream message.

    Layout: total length and headers length (uint32, big-endian), a CRC32 of those 8 bytes,
    the headers, the payload, and a CRC32 of everything before it.
    """
    header_bytes = b"".join(_eventstream_header(name, value) for name, value in headers.items())
    total_length = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack("!II", total_length, len(header_bytes))
    prelude += struct.pack("!I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + header_bytes + payload
    return message + struct.pack("!I", binascii.crc32(message) & 0xFFFFFFFF)


def encode_bedrock_event(event_type: str, data: dict) -> bytes:
    """Encode one stream event the way Bedrock's invoke-with-response-stream sends it."""
    if event_type == "error":
        error = data.get("error", {})
        exception_type = BEDROCK_EXCEPTION_TYPES.get(error.get("type"), BEDROCK_DEFAULT_EXCEPTION_TYPE)
        headers = {":message-type": "exception", ":exception-type": exception_type, ":content-type": "application/json"}
        return encode_eventstream_frame(headers, json.dumps({"message": error.get("message", "")}).encode("utf-8"))

    payload = {"bytes": base64.b64encode(json.dumps(data).encode("utf-8")).decode("ascii")}
    headers = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}
    return encode_eventstream_frame(headers, json.dumps(payload).encode("utf-8"))


# ---------------------------------------------------------------------------
# HTTP server
# ---------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: FakeAnthropicAPI) -> None:
        self.api = api
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up (or a connection closed by stop()) is normal for a test
        # server, so only unexpected errors are logged.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)) or self.api.stopping:
            logger.debug("fake Anthropic API: connection from %s closed: %r", client_address, error)
            return
        logger.error("fake Anthropic API: unhandled error for client %s", client_address, exc_info=error)


_Route = Callable[["_Handler"], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeAnthropicAPI/1.0"
    # Idle keep-alive connections close after this many seconds, so their threads end.
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.api._track_connection(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.api._untrack_connection(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake Anthropic API: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- request handling ---------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Skip trailer lines up to the blank line that ends the body.
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self) -> None:
        api = self.server.api
        try:
            raw_body = self._read_body()
        except (ValueError, OSError) as error:
            logger.debug("fake Anthropic API: failed to read the body of %s %s: %s", self.command, self.path, error)
            self.close_connection = True
            return

        try:
            self.body = json.loads(raw_body) if raw_body else None
            body_error = None
        except ValueError as error:
            self.body, body_error = None, f"request body: invalid JSON ({error})"

        self.path_only = urlsplit(self.path).path
        self.segments = [unquote(segment) for segment in self.path_only.split("/")[1:]]
        route, model = self._route()
        headers = {name.lower(): value for name, value in self.headers.items()}
        api._record(RecordedRequest(self.command, self.path, headers, self.body, model))

        try:
            if body_error is not None and self.command == "POST":
                self._send_error_reply(_error_reply(400, body_error))
            else:
                route(self)
        except _RequestError as error:
            self._send_error_reply(_error_reply(400, str(error)))
        except (ConnectionError, TimeoutError) as error:
            logger.debug("fake Anthropic API: client left during %s %s: %s", self.command, self.path, error)
            self.close_connection = True
        except Exception:
            logger.exception("fake Anthropic API: handler failed for %s %s", self.command, self.path)
            self.close_connection = True

    def _route(self) -> tuple[_Route, str | None]:
        """Return the handler for this request and the model id it names, if any."""
        method, segments = self.command, self.segments
        body_model = self.body.get("model") if isinstance(self.body, dict) else None

        if segments[:2] == ["v1", "messages"]:
            rest = segments[2:]
            if rest == []:
                return self._allow("POST", lambda h: h._messages(body_model, "anthropic")), body_model
            if rest == ["count_tokens"]:
                return self._allow("POST", _Handler._count_tokens), body_model
            if rest == ["batches"]:
                if method == "GET":
                    return _Handler._list_batches, None
                return self._allow("POST", _Handler._create_batch), None
            if len(rest) == 2 and rest[0] == "batches":
                return self._allow("GET", lambda h: h._retrieve_batch(rest[1])), None
            if len(rest) == 3 and rest[0] == "batches" and rest[2] == "results":
                return self._allow("GET", lambda h: h._batch_results(rest[1])), None

        if len(segments) == 3 and segments[0] == "model" and segments[2] in ("invoke", "invoke-with-response-stream"):
            model = segments[1]
            stream = segments[2] == "invoke-with-response-stream"
            return self._allow("POST", lambda h: h._messages(model, "bedrock", stream=stream)), model

        is_vertex_path = (
            len(segments) == 8
            and segments[0] == "projects"
            and segments[2] == "locations"
            and segments[4:7] == ["publishers", "anthropic", "models"]
        )
        if is_vertex_path:
            model, _, specifier = segments[7].rpartition(":")
            if model == "count-tokens" and specifier == "rawPredict":
                return self._allow("POST", _Handler._count_tokens), body_model
            if specifier in ("rawPredict", "streamRawPredict"):
                stream = specifier == "streamRawPredict"
                return self._allow("POST", lambda h: h._messages(model, "vertex", stream=stream)), model

        return _Handler._not_found, body_model

    def _allow(self, method: str, route: _Route) -> _Route:
        if self.command == method:
            return route
        return lambda handler: handler._send_error_reply(
            _error_reply(405, f"{handler.command} is not allowed on {handler.path_only}; use {method}"),
            extra_headers={"Allow": method},
        )

    def _not_found(self) -> None:
        self._send_error_reply(_error_reply(404, f"{self.command} {self.path_only} is not an endpoint of the fake API"))

    # -- responses ----------------------------------------------------------

    def _send_json(self, status: int, payload: Any, extra_headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self._send_bytes(status, "application/json", data, extra_headers)

    def _send_bytes(self, status: int, content_type: str, data: bytes, extra_headers: dict[str, str] | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", _new_id("req_"))
        for name, value in (extra_headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error_reply(self, reply: Reply, extra_headers: dict[str, str] | None = None) -> None:
        status = reply.status
        error_type = reply.error_type or DEFAULT_ERROR_TYPES.get(status, "api_error")
        message = reply.error_message or f"fake {error_type} (HTTP {status})"
        headers = dict(extra_headers or {})
        if status in (408, 409, 429) or status >= 500:
            headers["x-should-retry"] = "true"
            if self.server.api.retry_after_ms is not None:
                headers["retry-after-ms"] = str(self.server.api.retry_after_ms)
        headers.update(reply.headers)
        self._send_json(status, _error_body(error_type, message), headers)

    def _send_stream(self, plan: _Plan, platform: str) -> None:
        if platform == "bedrock":
            content_type, encode = "application/vnd.amazon.eventstream", encode_bedrock_event
        else:
            content_type, encode = "text/event-stream; charset=utf-8", encode_sse

        # The body is delimited by closing the connection, so a cut stream ends the same
        # way as a complete one and the SDK raises no transport error.
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", _new_id("req_"))
        for name, value in plan.reply.headers.items():
            self.send_header(name, value)
        self.end_headers()

        for event_type, data in _stream_events(plan):
            self.wfile.write(encode(event_type, data))

    # -- endpoints ------------------------------------------------------------

    def _messages(self, model: str | None, platform: str, stream: bool | None = None) -> None:
        api = self.server.api
        body = self.body
        if not isinstance(model, str) or not model:
            raise _RequestError("model: expected a non-empty string")
        _validate_messages(body, require_max_tokens=True)
        if stream is None:
            stream = bool(body.get("stream"))

        retry_count = self._retry_count()
        plan = api._plan_reply(body, model, retry_count)
        if plan.reply.delay_seconds > 0 and api._wait_stopping(plan.reply.delay_seconds):
            self.close_connection = True
            return

        if plan.reply.status >= 400:
            self._send_error_reply(plan.reply)
        elif stream:
            self._send_stream(plan, platform)
        else:
            self._send_json(plan.reply.status, plan.message, plan.reply.headers)

    def _retry_count(self) -> int:
        try:
            return int(self.headers.get(RETRY_COUNT_HEADER, "0"))
        except ValueError:
            return 0

    def _count_tokens(self) -> None:
        body = self.body
        _validate_messages(body, require_max_tokens=False)
        failure = _suffix_failure(str(body.get("model", "")), self._retry_count())
        if failure is not None:
            self._send_error_reply(failure)
            return
        self._send_json(200, {"input_tokens": _PromptSummary(body).all_input_tokens})

    def _create_batch(self) -> None:
        requests = self.body.get("requests") if isinstance(self.body, dict) else None
        if not isinstance(requests, list) or not requests:
            raise _RequestError("requests: expected a non-empty list")
        custom_ids = [item.get("custom_id") if isinstance(item, dict) else None for item in requests]
        if not all(isinstance(custom_id, str) and custom_id for custom_id in custom_ids):
            raise _RequestError("requests: every request needs a non-empty string custom_id")
        if len(set(custom_ids)) != len(custom_ids):
            raise _RequestError("requests: custom_id values must be unique within a batch")

        batch = self.server.api._create_batch(requests)
        self._send_json(200, batch)

    def _list_batches(self) -> None:
        batches = self.server.api._list_batches()
        page = {
            "data": batches,
            "has_more": False,
            "first_id": batches[0]["id"] if batches else None,
            "last_id": batches[-1]["id"] if batches else None,
        }
        self._send_json(200, page)

    def _retrieve_batch(self, batch_id: str) -> None:
        batch = self.server.api._get_batch(batch_id)
        if batch is None:
            self._send_error_reply(_error_reply(404, f"message batch {batch_id!r} not found"))
            return
        self._send_json(200, batch)

    def _batch_results(self, batch_id: str) -> None:
        lines = self.server.api._get_batch_results(batch_id)
        if lines is None:
            self._send_error_reply(_error_reply(404, f"message batch {batch_id!r} not found"))
            return
        data = "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")
        self._send_bytes(200, "application/x-jsonl", data, None)


class FakeAnthropicAPI:
    """A fake Anthropic API server on a daemon thread. The module docstring describes its replies.

    `retry_after_ms` is the ``retry-after-ms`` header sent with retryable errors. None omits
    it, and then anthropic 2.17.0 falls back to its exponential backoff of about 0.5 s before
    the first retry and 1 s before the second.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, retry_after_ms: int | None = 1) -> None:
        self.host = host
        self.port = port
        self.retry_after_ms = retry_after_ms
        self.requests: list[RecordedRequest] = []

        self._lock = threading.Lock()
        self._stopping_event = threading.Event()
        self._replies: deque[Reply] = deque()
        self._model_usage: dict[str, dict] = {}
        self._cached_prefixes: set[tuple[str, str]] = set()
        self._batches: dict[str, dict] = {}
        self._batch_results: dict[str, list[dict]] = {}
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> FakeAnthropicAPI:
        """Bind the socket and serve on a daemon thread. Return self."""
        if self._server is not None:
            raise RuntimeError("FakeAnthropicAPI is already started; call stop() before starting it again")
        self._stopping_event.clear()
        self._server = _Server((self.host, self.port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-anthropic-api-{self.port}",
            daemon=True,
        )
        self._thread.start()
        logger.debug("fake Anthropic API: serving on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving and close open connections, including unfinished streams."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping_event.set()
        server.shutdown()

        # Keep-alive connections would otherwise keep their handler threads blocked in recv().
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        server.server_close()
        if thread is not None:
            thread.join(timeout=1.0)
        self._server = None
        self._thread = None
        logger.debug("fake Anthropic API: stopped on port %s", self.port)

    def __enter__(self) -> FakeAnthropicAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stopping(self) -> bool:
        return self._stopping_event.is_set()

    # -- scripting ------------------------------------------------------------

    def enqueue(self, reply: Reply) -> None:
        """Queue `reply` for a later messages request on any platform. Replies are used in FIFO order."""
        with self._lock:
            self._replies.append(reply)

    def set_model_usage(self, model: str, usage: dict) -> None:
        """Make every later call to `model` report exactly `usage`."""
        with self._lock:
            self._model_usage[model] = copy.deepcopy(usage)

    def reset(self) -> None:
        """Forget recorded requests, scripted replies, model usage, cache state and batches."""
        with self._lock:
            self.requests.clear()
            self._replies.clear()
            self._model_usage.clear()
            self._cached_prefixes.clear()
            self._batches.clear()
            self._batch_results.clear()

    def requests_to(self, path_suffix: str) -> list[RecordedRequest]:
        """Return the recorded requests whose path (without query) ends with `path_suffix`."""
        with self._lock:
            return [request for request in self.requests if urlsplit(request.path).path.endswith(path_suffix)]

    # -- internals used by the handler -----------------------------------------

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def _track_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _untrack_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def _wait_stopping(self, seconds: float) -> bool:
        """Sleep for `seconds`, or return True as soon as the server starts stopping."""
        return self._stopping_event.wait(seconds)

    def _plan_reply(self, body: dict, model: str, retry_count: int) -> _Plan:
        with self._lock:
            scripted = self._replies.popleft() if self._replies else None

        if scripted is not None:
            return self._plan_scripted(scripted, body, model)

        failure = _suffix_failure(model, retry_count)
        if failure is not None:
            return _Plan(reply=failure)

        reply = Reply(
            cut_before_delta=model.endswith("-cut-stream"),
            sse_error_after_start=model.endswith("-sse-error"),
        )
        return self._plan_default(reply, body, model)

    def _plan_scripted(self, reply: Reply, body: dict, model: str) -> _Plan:
        if reply.status >= 400:
            return _Plan(reply=reply)

        summary = _PromptSummary(body)
        if reply.usage is not None:
            usage = copy.deepcopy(reply.usage)
            start_usage = copy.deepcopy(reply.usage)
            delta_usage = {"output_tokens": usage.get("output_tokens", 0)}
        else:
            output_tokens = min(body["max_tokens"], _default_output_tokens(summary))
            usage, start_usage, delta_usage = self._derive_usage(summary, model, output_tokens)
        if reply.delta_usage is not None:
            delta_usage = copy.deepcopy(reply.delta_usage)

        content = reply.content
        if content is None:
            content = [{"type": "text", "text": _filler_text(usage.get("output_tokens", 1))}]
        message = self._message(reply, model, content, reply.stop_reason, usage)
        return _Plan(reply=reply, message=message, start_usage=start_usage, delta_usage=delta_usage)

    def _plan_default(self, reply: Reply, body: dict, model: str) -> _Plan:
        """Plan the unscripted reply. Only the stream flags of `reply` are used."""
        summary = _PromptSummary(body)
        requested_output = _default_output_tokens(summary)
        output_tokens = min(body["max_tokens"], requested_output)

        if _wants_tool_call(body):
            tool = body["tools"][0]
            tool_use = {
                "type": "tool_use",
                "id": _new_id("toolu_"),
                "name": tool.get("name", "tool"),
                "input": _example_tool_input(tool),
            }
            content = [tool_use]
            stop_reason = "tool_use"
        else:
            content = [{"type": "text", "text": _filler_text(output_tokens)}]
            stop_reason = "max_tokens" if output_tokens < requested_output else "end_turn"

        usage, start_usage, delta_usage = self._derive_usage(summary, model, output_tokens)
        message = self._message(reply, model, content, stop_reason, usage)
        return _Plan(reply=reply, message=message, start_usage=start_usage, delta_usage=delta_usage)

    def _derive_usage(self, summary: _PromptSummary, model: str, output_tokens: int) -> tuple[dict, dict, dict]:
        """Return the usage, the ``message_start`` usage and the ``message_delta`` usage for one call.

        A usage fixed with set_model_usage() wins. Otherwise the cache state is updated:
        the first call with a cached prefix writes it and later calls read it.
        """
        with self._lock:
            fixed_usage = self._model_usage.get(model)
        if fixed_usage is not None:
            usage = copy.deepcopy(fixed_usage)
            return usage, copy.deepcopy(usage), {"output_tokens": usage.get("output_tokens", 0)}

        # NOTE: cache entries never expire and only `system` breakpoints count, unlike the live API,
        # which also caches tools and messages and evicts entries after their TTL.
        cache_write = {"5m": 0, "1h": 0}
        cache_read = 0
        if summary.cached_prefix:
            key = (model, summary.cached_prefix)
            with self._lock:
                seen = key in self._cached_prefixes
                self._cached_prefixes.add(key)
            for ttl, tokens in summary.cached_segments:
                if seen:
                    cache_read += tokens
                else:
                    cache_write[ttl] += tokens

        usage = {
            "input_tokens": summary.uncached_input_tokens,
            "cache_creation_input_tokens": cache_write["5m"] + cache_write["1h"],
            "cache_read_input_tokens": cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write["5m"],
                "ephemeral_1h_input_tokens": cache_write["1h"],
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        # The live API sends a small output count in message_start and cumulative totals in message_delta.
        start_usage = dict(usage, output_tokens=1, cache_creation=dict(usage["cache_creation"]))
        delta_usage = {
            "input_tokens": usage["input_tokens"],
            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"],
            "output_tokens": output_tokens,
        }
        return usage, start_usage, delta_usage

    @staticmethod
    def _message(reply: Reply, model: str, content: list[dict], stop_reason: str | None, usage: dict) -> dict:
        return {
            "id": reply.id or _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": reply.model or model,
            "content": copy.deepcopy(content),
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }

    # -- batches ----------------------------------------------------------------

    def _batch_line(self, item: dict) -> dict:
        """Build the result line for one batch request. Scripted replies do not apply to batches."""
        custom_id = item["custom_id"]
        params = item.get("params")
        model = params.get("model") if isinstance(params, dict) else None
        try:
            if not isinstance(model, str) or not model:
                raise _RequestError("params.model: expected a non-empty string")
            _validate_messages(params, require_max_tokens=True)
        except _RequestError as error:
            return self._errored_line(custom_id, "invalid_request_error", str(error))

        # A batch request has no retries, so `-overloaded-once` succeeds here.
        failure = _suffix_failure(model, retry_count=1)
        if failure is not None:
            return self._errored_line(custom_id, failure.error_type or "api_error", failure.error_message or "")

        message = self._plan_default(Reply(), params, model).message
        assert message is not None
        if "service_tier" in message["usage"]:
            message["usage"]["service_tier"] = "batch"
        return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}

    @staticmethod
    def _errored_line(custom_id: str, error_type: str, message: str) -> dict:
        return {"custom_id": custom_id, "result": {"type": "errored", "error": _error_body(error_type, message)}}

    def _create_batch(self, requests: list[dict]) -> dict:
        lines = [self._batch_line(item) for item in requests]
        succeeded = sum(1 for line in lines if line["result"]["type"] == "succeeded")
        batch_id = _new_id("msgbatch_")
        now = datetime.now(timezone.utc)
        batch = {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "ended",
            "request_counts": {
                "processing": 0,
                "succeeded": succeeded,
                "errored": len(lines) - succeeded,
                "canceled": 0,
                "expired": 0,
            },
            "created_at": _utc_timestamp(now),
            "ended_at": _utc_timestamp(now),
            "expires_at": _utc_timestamp(now + timedelta(hours=24)),
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch_id}/results",
        }
        with self._lock:
            self._batches[batch_id] = batch
            self._batch_results[batch_id] = lines
        return batch

    def _list_batches(self) -> list[dict]:
        with self._lock:
            return list(reversed(self._batches.values()))

    def _get_batch(self, batch_id: str) -> dict | None:
        with self._lock:
            return self._batches.get(batch_id)

    def _get_batch_results(self, batch_id: str) -> list[dict] | None:
        with self._lock:
            return self._batch_results.get(batch_id)
