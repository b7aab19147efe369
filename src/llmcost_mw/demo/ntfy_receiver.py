"""Local stand-in for an ntfy server, for tests and the offline demo.

`NtfyReceiver` serves on 127.0.0.1 (a free port) from a daemon thread and
accepts the two ntfy publish forms:

* JSON at the root: ``POST /`` (or ``PUT``) with ``{"topic", "title", "message",
  "priority", "tags", "click"}``.
* Plain: ``POST /<topic>`` with the message as the body and the ``Title``
  (or ``X-Title``), ``Priority``, ``Tags`` and ``Click`` headers. A title may
  be an RFC 2047 encoded word (``=?UTF-8?B?...?=``) or raw UTF-8.

Every accepted message is kept in `messages`, with the request's
Authorization header. `set_mode` changes how the server responds, at run time:

* ``ok``: 200 with the message as JSON, as ntfy replies.
* ``fail``: 500, and the message is dropped.
* ``throttle``: 429, as ntfy replies when a visitor's rate limit is reached.
* ``hang``: no answer for `hang_seconds` (longer than a client's timeout),
  then 503; the message is dropped.

It uses only the standard library.
"""

from __future__ import annotations

import email.errors
import email.header
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MODES", "NtfyReceiver", "ReceivedMessage"]

MODES = ("ok", "fail", "throttle", "hang")

_TOPIC = re.compile(r"[-_A-Za-z0-9]{1,64}")
_PRIORITY_NAMES = {"min": 1, "low": 2, "default": 3, "high": 4, "max": 5, "urgent": 5}
_MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One message the receiver accepted. `body` is the raw request body."""

    topic: str
    title: str | None
    message: str
    priority: int
    tags: tuple[str, ...]
    click: str | None
    authorization: str | None
    body: bytes


class _BadRequest(Exception):
    pass


class NtfyReceiver:
    """A local ntfy publish endpoint that records what it receives.

    With `required_authorization` set, requests whose Authorization header
    differs get 401, as ntfy responds to a wrong token.
    """

    def __init__(self, *, hang_seconds: float = 30.0, required_authorization: str | None = None) -> None:
        self.hang_seconds = hang_seconds
        self.required_authorization = required_authorization
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._mode = "ok"
        self._mode_requests_left: int | None = None
        self._request_count = 0
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> NtfyReceiver:
        """Start serving on 127.0.0.1 at a free port; return self."""
        if self._server is not None:
            return self
        self._release.clear()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        server.daemon_threads = True
        self._server = server
        # A short poll interval makes stop() return in about 50 ms instead of 500.
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="ntfy-receiver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; requests held in hang mode are released first."""
        server, self._server = self._server, None
        if server is None:
            return
        self._release.set()
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> NtfyReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- state --------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server root, ending with '/': the JSON publish URL."""
        if self._server is None:
            raise RuntimeError("the ntfy receiver is not running; call start() first")
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/"

    def topic_url(self, topic: str) -> str:
        """Return the URL of a topic, the form users configure."""
        return self.url + topic

    @property
    def messages(self) -> list[ReceivedMessage]:
        """A copy of the accepted messages, oldest first."""
        with self._lock:
            return list(self._messages)

    @property
    def request_count(self) -> int:
        """The number of publish requests received, accepted or not."""
        with self._lock:
            return self._request_count

    @property
    def mode(self) -> str:
        with self._lock:
            return self._mode

    def set_mode(self, mode: str, *, requests: int | None = None) -> None:
        """Respond to the next requests in `mode`; after `requests` of them (if given), return to ``ok``."""
        if mode not in MODES:
            raise ValueError(f"invalid mode {mode!r}: use one of {', '.join(MODES)}")
        if requests is not None and requests < 1:
            raise ValueError(f"invalid requests {requests!r}: use a count >= 1 or None")
        with self._lock:
            self._mode = mode
            self._mode_requests_left = requests

    def clear(self) -> None:
        """Forget the messages received so far."""
        with self._lock:
            self._messages.clear()

    # -- request handling, called from the server's threads -------------------

    def _next_mode(self) -> str:
        with self._lock:
            self._request_count += 1
            mode = self._mode
            if self._mode_requests_left is not None:
                self._mode_requests_left -= 1
                if self._mode_requests_left <= 0:
                    self._mode, self._mode_requests_left = "ok", None
            return mode

    def _accept(self, message: ReceivedMessage) -> None:
        with self._lock:
            self._messages.append(message)


def _make_handler(receiver: NtfyReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self._publish()

        def do_PUT(self) -> None:
            self._publish()

        def do_GET(self) -> None:
            self._send_json(404, {"code": 40401, "http": 404, "error": "page not found"})

        def _publish(self) -> None:
            body = self._read_body()
            if body is None:
                return
            authorization = self.headers.get("Authorization")
            if (
                receiver.required_authorization is not None
                and authorization != receiver.required_authorization
            ):
                self._send_json(401, {"code": 40101, "http": 401, "error": "unauthorized"})
                return

            mode = receiver._next_mode()
            if mode == "fail":
                self._send_json(500, {"code": 50001, "http": 500, "error": "internal server error"})
                return
            if mode == "throttle":
                self._send_json(
                    429, {"code": 42901, "http": 429, "error": "limit reached: too many requests"}
                )
                return
            if mode == "hang":
                receiver._release.wait(receiver.hang_seconds)
                self._send_json(503, {"code": 50301, "http": 503, "error": "service unavailable"})
                return

            try:
                message = self._parse(body, authorization)
            except _BadRequest as exc:
                self._send_json(400, {"code": 40001, "http": 400, "error": str(exc)})
                return
            receiver._accept(message)
            self._send_json(
                200,
                {
                    "id": secrets.token_hex(6),
                    "time": int(time.time()),
                    "event": "message",
                    "topic": message.topic,
                    "title": message.title,
                    "message": message.message,
                    "priority": message.priority,
                    "tags": list(message.tags),
                    "click": message.click,
                },
            )

        def _read_body(self) -> bytes | None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= _MAX_BODY_BYTES:
                self._send_json(
                    413, {"code": 41301, "http": 413, "error": "invalid or too large Content-Length"}
                )
                return None
            return self.rfile.read(length)

        def _parse(self, body: bytes, authorization: str | None) -> ReceivedMessage:
            path = self.path.split("?", 1)[0]
            if path == "/":
                return _parse_json(body, authorization)
            topic = path.strip("/")
            if not _TOPIC.fullmatch(topic):
                raise _BadRequest("invalid topic")
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise _BadRequest("the message is not UTF-8") from None
            tags = self._header("Tags", "X-Tags", "Tag", "Ta")
            return ReceivedMessage(
                topic=topic,
                title=self._header("Title", "X-Title", "T"),
                message=text,
                priority=_priority(self._header("Priority", "X-Priority", "Prio", "P")),
                tags=tuple(tag.strip() for tag in tags.split(",") if tag.strip()) if tags else (),
                click=self._header("Click", "X-Click"),
                authorization=authorization,
                body=body,
            )

        def _header(self, *names: str) -> str | None:
            for name in names:
                value = self.headers.get(name)
                if value is not None:
                    return _decode_header(value)
            return None

        def _send_json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up first, as it does in hang mode.
                pass

        def log_message(self, format: str, *args: Any) -> None:
            # Tests and the demo print their own output; request lines would be noise.
            pass

    return Handler


def _parse_json(body: bytes, authorization: str | None) -> ReceivedMessage:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest("invalid JSON body") from None
    if not isinstance(data, dict):
        raise _BadRequest("the JSON body must be an object")
    topic = data.get("topic")
    if not isinstance(topic, str) or not _TOPIC.fullmatch(topic):
        raise _BadRequest("invalid topic")
    tags = data.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        raise _BadRequest("tags must be a list of strings")
    title = data.get("title")
    click = data.get("click")
    return ReceivedMessage(
        topic=topic,
        title=str(title) if title is not None else None,
        message=str(data.get("message", "triggered")),
        priority=_priority(data.get("priority")),
        tags=tuple(tags),
        click=str(click) if click is not None else None,
        authorization=authorization,
        body=body,
    )


def _priority(value: Any) -> int:
    if value is None or value == "":
        return 3
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
        return value
    text = str(value).strip().lower()
    if text.isdigit() and 1 <= int(text) <= 5:
        return int(text)
    if text in _PRIORITY_NAMES:
        return _PRIORITY_NAMES[text]
    raise _BadRequest("invalid priority: use 1 to 5 or min, low, default, high, max, urgent")


def _decode_header(value: str) -> str:
    """Decode an RFC 2047 encoded word, or raw UTF-8 that http.server read as Latin-1."""
    if "=?" in value:
        try:
            return str(email.header.make_header(email.header.decode_header(value)))
        except (UnicodeDecodeError, LookupError, email.errors.HeaderParseError):
            raise _BadRequest("invalid encoded-word in a header") from None
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value
