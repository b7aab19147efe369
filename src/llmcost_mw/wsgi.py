"""WSGI middleware that opens the attribution of each HTTP request.

Use it with any PEP 3333 app; the tests run it on Flask and on plain WSGI
callables. For Flask, `llmcost_mw.flask_ext.LLMCostFlask` wraps the app
with it and adds the URL rule as the default feature.

Each request runs in its own copy of the `contextvars` context: the app call,
every `next()` on the response body and its `close()`. So a body produced by
a generator keeps the request's attribution while the server iterates it,
after the app has returned, and nothing is left behind on the server's
thread: the next request on a reused thread starts with no attribution.

The user comes from a callable that reads the request. `user_header=` reads
it from a request header instead: use that only behind a trusted proxy that
sets the header itself, since any client can send it.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .context import Attribution, _current

__all__ = ["ENVIRON_KEY", "LLMCostWSGIMiddleware"]

logger = logging.getLogger(__name__)

Environ = dict[str, Any]
Resolver = Callable[[Environ], "str | None"]

# The request's Attribution is stored in the WSGI environ under this key until
# the request ends, for framework hooks that run after the app has returned.
ENVIRON_KEY = "llmcost_mw.attribution"


class LLMCostWSGIMiddleware:
    """Sets the user, feature and request id that LLM calls in a WSGI request are billed to.

    Options:
        user_id: called with the WSGI environ when an LLM call is made;
            returns the user id or None.
        user_header: a header to read the user id from; trusted-proxy only.
        feature: called with the WSGI environ when an LLM call is made;
            returns the feature name or None. A plain WSGI app has no route
            template, so without this option the feature is None unless the
            app names it with `set_attribution(feature=...)`.
        request_id_header: a header that carries the request id; without it
            an id is generated.
        on_complete: called with the request's `Attribution` once the request
            has ended, which is when the server closes the response body. It
            is called as soon as the app returns when the app raised, or when
            the body is a list, tuple or `wsgi.file_wrapper`, because sending
            those runs no app code. It reads the final values, including a
            feature or user that the app set with `set_attribution`. The
            attribution is closed by then. An exception from it is logged,
            not raised.
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
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
        self.user_header = _environ_key(user_header)
        self.feature_resolver = feature
        self.request_id_header = _environ_key(request_id_header)
        self.on_complete = on_complete

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        attribution = Attribution(
            user_id=_header(environ, self.user_header),
            request_id=_header(environ, self.request_id_header),
            user_resolver=_bind(self.user_resolver, environ, "user_id"),
            feature_resolver=_bind(self.feature_resolver, environ, "feature"),
        )
        environ[ENVIRON_KEY] = attribution
        # A fresh copy per request: setting the variable inside it never
        # touches the server thread's own context, so there is nothing to reset.
        context = contextvars.copy_context()
        try:
            body = context.run(_run_app, self.app, attribution, environ, start_response)
        except BaseException:
            self._finish(attribution, environ)
            raise

        file_wrapper = environ.get("wsgi.file_wrapper")
        if type(body) in (list, tuple) or (isinstance(file_wrapper, type) and isinstance(body, file_wrapper)):
            # Sending these runs no app code. Returning a file wrapper
            # unchanged keeps the server's sendfile path.
            self._finish(attribution, environ)
            return body
        return _AttributedBody(body, context, functools.partial(self._finish, attribution, environ))

    def _finish(self, attribution: Attribution, environ: Environ) -> None:
        attribution.closed = True
        # The resolvers refer to the environ, so the entry would make a
        # reference cycle that only the garbage collector could free.
        environ.pop(ENVIRON_KEY, None)
        if self.on_complete is None:
            return
        try:
            self.on_complete(attribution)
        except Exception:
            # The response is already sent; a failing callback must not turn it into an error.
            logger.exception("the on_complete callback passed to LLMCostWSGIMiddleware failed")


def _run_app(
    app: Callable[..., Iterable[bytes]],
    attribution: Attribution,
    environ: Environ,
    start_response: Callable[..., Any],
) -> Iterable[bytes]:
    _current.set(attribution)
    return app(environ, start_response)


class _AttributedBody:
    """A response body whose iteration and `close()` run in the request's context.

    A generator body runs its code on each `next()`, after the app has
    returned. Without this wrapper, its LLM calls would be recorded with
    whatever the server thread's context contains, which is no attribution.
    """

    __slots__ = ("_body", "_iterator", "_context", "_finish", "_closed")

    def __init__(
        self, body: Iterable[bytes], context: contextvars.Context, finish: Callable[[], None]
    ) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._context = context
        self._finish = finish
        self._closed = False

    def __iter__(self) -> _AttributedBody:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = self._context.run(iter, self._body)
        return self._context.run(next, self._iterator)

    def close(self) -> None:
        # PEP 3333 servers call close() once the body is sent, also after an
        # error or a client disconnect, so this is where the request ends.
        # NOTE: a server that never calls close() leaves the attribution open,
        # and a thread started in the request keeps billing its user.
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                self._context.run(close)
        finally:
            self._finish()


def _header(environ: Environ, key: str | None) -> str | None:
    if key is None:
        return None
    return environ.get(key) or None


def _environ_key(header: str | None) -> str | None:
    if not header:
        return None
    return "HTTP_" + header.upper().replace("-", "_")


def _bind(resolver: Resolver | None, environ: Environ, what: str) -> Callable[[], str | None] | None:
    if resolver is None:
        return None

    def resolve() -> str | None:
        try:
            return resolver(environ)
        except Exception:
            # A failing resolver must not fail the LLM call; the row is
            # recorded without this value.
            logger.exception("the %s resolver passed to LLMCostWSGIMiddleware failed", what)
            return None

    return resolve
