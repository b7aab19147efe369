"""ASGI middleware that opens the attribution of each HTTP request.

Use it with Starlette, FastAPI or any ASGI app. It is a pure ASGI class, so
streaming responses and background tasks run inside the attribution it sets,
and it costs one object and one ContextVar set per request.

The user comes from a callable that reads the app's own authenticated user.
`user_header=` reads it from a request header instead: use that only behind
a trusted proxy that sets the header itself, since any client can send it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from starlette.requests import HTTPConnection

from .context import Attribution, _current
from .instrumentation import current_tracker

__all__ = ["LLMCostMiddleware", "route_template"]

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Resolver = Callable[[HTTPConnection], "str | None"]


def route_template(scope: Scope, root_path: str = "") -> str | None:
    """Return the path template of the route that served a request, such as `/summarize/{doc_id}`.

    Starlette stores the matched route in the scope once its router has run;
    before that, and for unmatched paths, there is none. The raw path is
    never returned, so that one route is one feature.
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not template:
        return None
    # Inside a Mount, the route's template is relative to the mount point.
    mount_prefix = scope.get("root_path", "")[len(root_path) :]
    return f"{mount_prefix}{template}"


def _lifespan_send(send: Any) -> Any:
    """Start the recorder's writer at start-up and write its queue at shutdown.

    The writer then starts outside any request. Writing at shutdown matters
    because uvicorn ends the process by re-raising SIGTERM with its default
    action once the app has shut down, and that skips atexit handlers.
    """

    async def send_and_hook(message: dict[str, Any]) -> None:
        tracker = current_tracker()
        if tracker is not None:
            if message["type"] == "lifespan.startup.complete":
                tracker.recorder.start()
            elif message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await anyio.to_thread.run_sync(tracker.recorder.close)
        await send(message)

    return send_and_hook


def _notify_complete(callback: Callable[[Attribution], object], attribution: Attribution) -> None:
    try:
        callback(attribution)
    except Exception:
        # The response is already sent; a failing callback must not turn it into an error.
        logger.exception("the on_complete callback passed to the llmcost middleware failed")


class LLMCostMiddleware:
    """Sets the user, feature and request id that LLM calls in a request are billed to.

    Options:
        user_id: called with the request's `HTTPConnection` when an LLM call
            is made; returns the user id or None. It runs after routing and
            dependencies, so it can read what authentication stored in
            `request.state` or `scope["user"]`.
        user_header: a header to read the user id from; trusted-proxy only.
        feature: called with the request's `HTTPConnection`; returns the
            feature name, or None to fall back to the route template.
        request_id_header: a header that carries the request id; without it
            an id is generated.
        on_complete: called with the request's `Attribution` once the
            request has ended: after the response is sent and its background
            tasks have run, or after the app raised. It reads the final
            values, including a feature or user that the endpoint set with
            `set_attribution`. The attribution is closed by then, so LLM
            calls made inside the callback are not billed to the request.
            An exception from it is logged, not raised.
    """

    def __init__(
        self,
        app: Any,
        *,
        user_id: Resolver | None = None,
        user_header: str | None = None,
        feature: Resolver | None = None,
        request_id_header: str | None = "x-request-id",
        on_complete: Callable[[Attribution], object] | None = None,
    ) -> None:
        if user_id is not None and user_header is not None:
            raise ValueError("pass either user_id= or user_header=, not both")
        self.app = app
        self.user_resolver = user_id
        self.user_header = user_header.lower().encode("latin-1") if user_header else None
        self.feature_resolver = feature
        self.request_id_header = request_id_header.lower().encode("latin-1") if request_id_header else None
        self.on_complete = on_complete

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _lifespan_send(send))
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        attribution = Attribution(
            user_id=self._header(scope, self.user_header),
            request_id=self._header(scope, self.request_id_header),
            user_resolver=self._bind(self.user_resolver, scope, "user_id"),
            feature_resolver=self._feature_of(scope),
        )
        token = _current.set(attribution)
        try:
            await self.app(scope, receive, send)
        finally:
            attribution.closed = True
            _current.reset(token)
            if self.on_complete is not None:
                _notify_complete(self.on_complete, attribution)

    @staticmethod
    def _header(scope: Scope, name: bytes | None) -> str | None:
        if name is None:
            return None
        for key, value in scope.get("headers", ()):
            if key == name:
                return value.decode("latin-1") or None
        return None

    @staticmethod
    def _bind(resolver: Resolver | None, scope: Scope, what: str) -> Callable[[], str | None] | None:
        if resolver is None:
            return None

        def resolve() -> str | None:
            try:
                return resolver(HTTPConnection(scope))
            except Exception:
                # A failing resolver must not fail the LLM call; the row is
                # recorded without this value.
                logger.exception("the %s resolver passed to LLMCostMiddleware failed", what)
                return None

        return resolve

    def _feature_of(self, scope: Scope) -> Callable[[], str | None]:
        custom = self._bind(self.feature_resolver, scope, "feature")
        root_path = scope.get("root_path", "")

        def resolve() -> str | None:
            if custom is not None:
                value = custom()
                if value is not None:
                    return value
            return route_template(scope, root_path)

        return resolve
