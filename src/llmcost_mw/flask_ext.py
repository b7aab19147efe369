"""Flask integration: bill each request's LLM calls to its user and URL rule.

    from llmcost_mw.flask_ext import LLMCostFlask

    llmcost = LLMCostFlask(app, user_id=lambda request: g.get("user_id"))

The feature is, by default, the template of the URL rule that matched, such
as `/summarize/<doc_id>`: one rule is one feature, like the route template
that `LLMCostMiddleware` records for FastAPI. Pass
`feature=lambda request: request.endpoint` to record endpoint names
(`summarize`) instead. A view can still name its feature with
`llmcost_mw.set_attribution(feature=...)`.

The extension wraps `app.wsgi_app` with `LLMCostWSGIMiddleware`, so a
response body streamed by a plain generator keeps the request's attribution.
`flask.stream_with_context` is only needed when the generator reads
`request` or `g` itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import flask

from .context import Attribution
from .wsgi import ENVIRON_KEY, LLMCostWSGIMiddleware

__all__ = ["LLMCostFlask"]

logger = logging.getLogger(__name__)

RequestResolver = Callable[[flask.Request], "str | None"]


class LLMCostFlask:
    """Flask extension that adds `LLMCostWSGIMiddleware` with Flask-aware resolvers.

    Options:
        user_id: called with `flask.request` when an LLM call is made, while
            the request context is active, so it can read `flask.g`, the
            session or a login extension's current user. Returns the user id
            or None.
        user_header: a header to read the user id from; trusted-proxy only.
        feature: called with `flask.request`; returns the feature name, or
            None to fall back to the URL rule template.
        request_id_header: a header that carries the request id; without it
            an id is generated.
        on_complete: called with the request's `Attribution` once the
            response body is closed; see `LLMCostWSGIMiddleware`.

    When the request context ends (Flask's teardown), the user and feature
    are resolved one last time and kept as values. Code that runs after that
    and before the response body is closed, such as a streamed generator or
    a thread started with `llmcost_mw.start_thread`, is billed to the same
    user and feature without a request context.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        user_id: RequestResolver | None = None,
        user_header: str | None = None,
        feature: RequestResolver | None = None,
        request_id_header: str | None = "x-request-id",
        on_complete: Callable[[Attribution], object] | None = None,
    ) -> None:
        if user_id is not None and user_header is not None:
            raise ValueError("pass either user_id= or user_header=, not both")
        self.user_resolver = user_id
        self.user_header = user_header
        self.feature_resolver = feature
        self.request_id_header = request_id_header
        self.on_complete = on_complete
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Wrap `app.wsgi_app` with the middleware and register the teardown hook.

        Raises RuntimeError when the app already has an `LLMCostFlask`,
        because a second middleware would open a second attribution.
        """
        if "llmcost_mw" in app.extensions:
            raise RuntimeError(f"LLMCostFlask is already registered on the Flask app {app.name!r}")
        app.wsgi_app = LLMCostWSGIMiddleware(  # type: ignore[method-assign]
            app.wsgi_app,
            user_id=self._resolve_user if self.user_resolver is not None else None,
            user_header=self.user_header,
            feature=self._resolve_feature,
            request_id_header=self.request_id_header,
            on_complete=self.on_complete,
        )
        app.teardown_request(_freeze_attribution)
        app.extensions["llmcost_mw"] = self

    def _resolve_user(self, environ: dict[str, Any]) -> str | None:
        request = _request_for(environ)
        if request is None or self.user_resolver is None:
            return None
        return self.user_resolver(request)

    def _resolve_feature(self, environ: dict[str, Any]) -> str | None:
        request = _request_for(environ)
        if request is None:
            return None
        if self.feature_resolver is not None:
            try:
                value = self.feature_resolver(request)
            except Exception:
                # Same policy as the middleware: log, then fall back to the URL rule.
                logger.exception("the feature resolver passed to LLMCostFlask failed")
                value = None
            if value is not None:
                return value
        rule = request.url_rule
        return rule.rule if rule is not None else None


def _request_for(environ: dict[str, Any]) -> flask.Request | None:
    """Return the active Flask request if it is the one for `environ`, else None."""
    if not flask.has_request_context():
        return None
    request = flask.request._get_current_object()  # type: ignore[attr-defined]
    # Compared by the attribution stored in both, because a middleware
    # between this one and Flask may have passed on a copy of the environ.
    if request.environ.get(ENVIRON_KEY) is not environ.get(ENVIRON_KEY):
        return None
    return request


def _freeze_attribution(_error: BaseException | None) -> None:
    # Flask runs teardown while the request context still exists; resolve
    # the lazy values now, because `request` and `g` are gone afterwards.
    attribution = flask.request.environ.get(ENVIRON_KEY)
    if not isinstance(attribution, Attribution):
        return
    if attribution.user_resolver is not None:
        attribution.user_id = attribution.user_id
        attribution.user_resolver = None
    if attribution.feature_resolver is not None:
        attribution.feature = attribution.feature
        attribution.feature_resolver = None
