"""Attribution context: the user, feature and request that an LLM call is billed to.

The middleware opens one `Attribution` per HTTP request and stores it in a
ContextVar. Instrumentation reads it at the moment an SDK call is made, so the
values travel with asyncio tasks and with executors that copy the context.
Outside HTTP (jobs, scripts), `attribute(...)` opens the same scope by hand.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "Attribution",
    "AttributionSnapshot",
    "attribute",
    "capture",
    "current_attribution",
    "set_attribution",
    "start_thread",
    "submit",
]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_UNSET: Any = object()


class Attribution:
    """The mutable attribution of one request or job.

    The user and feature can be given as values or as resolvers: callables
    that are evaluated each time a call is captured. Resolvers let the
    middleware read a user that authentication sets after routing, and the
    route template that Starlette sets only once the router has matched.
    """

    __slots__ = ("_user_id", "_feature", "_request_id", "user_resolver", "feature_resolver", "closed")

    def __init__(
        self,
        *,
        user_id: str | None = None,
        feature: str | None = None,
        request_id: str | None = None,
        user_resolver: Callable[[], str | None] | None = None,
        feature_resolver: Callable[[], str | None] | None = None,
    ) -> None:
        self._user_id = user_id
        self._feature = feature
        self._request_id = request_id
        self.user_resolver = user_resolver
        self.feature_resolver = feature_resolver
        # Set when the request or job ends. A thread or task that outlives it
        # must not bill later calls to this user.
        self.closed = False

    @property
    def user_id(self) -> str | None:
        # The resolver is read once: another thread may replace it with None
        # (set_attribution) between a check and a call.
        resolver = self.user_resolver
        if self._user_id is None and resolver is not None:
            return _stringify(resolver())
        return self._user_id

    @user_id.setter
    def user_id(self, value: str | None) -> None:
        self._user_id = value

    @property
    def feature(self) -> str | None:
        resolver = self.feature_resolver
        if self._feature is None and resolver is not None:
            return _stringify(resolver())
        return self._feature

    @feature.setter
    def feature(self, value: str | None) -> None:
        self._feature = value

    @property
    def request_id(self) -> str:
        # Generated on first use: most requests never call an LLM.
        if self._request_id is None:
            self._request_id = uuid.uuid4().hex
        return self._request_id

    def child(self, *, user_id: Any = _UNSET, feature: Any = _UNSET, request_id: Any = _UNSET) -> Attribution:
        """Return a copy with some values overridden; unset values inherit from this one."""
        copy = Attribution(
            user_id=self._user_id,
            feature=self._feature,
            request_id=self._request_id,
            user_resolver=self.user_resolver,
            feature_resolver=self.feature_resolver,
        )
        if user_id is not _UNSET:
            copy._user_id = user_id
            copy.user_resolver = None
        if feature is not _UNSET:
            copy._feature = feature
            copy.feature_resolver = None
        if request_id is not _UNSET:
            copy._request_id = request_id
        return copy

    def __repr__(self) -> str:
        return (
            f"Attribution(user_id={self._user_id!r}, feature={self._feature!r}, "
            f"request_id={self._request_id!r}, closed={self.closed})"
        )


@dataclass(frozen=True, slots=True)
class AttributionSnapshot:
    """The attribution values copied into a cost event when a call is made."""

    user_id: str | None
    feature: str | None
    request_id: str | None
    context_missing: bool


_current: ContextVar[Attribution | None] = ContextVar("llmcost_attribution", default=None)

_MISSING = AttributionSnapshot(user_id=None, feature=None, request_id=None, context_missing=True)


def current_attribution() -> Attribution | None:
    """Return the attribution open in this context, or None outside any request or `attribute` block."""
    return _current.get()


def capture() -> AttributionSnapshot:
    """Copy the current attribution into an immutable snapshot.

    A closed attribution (its request has ended, but a thread or task started
    during it still runs) counts as missing, so it is never billed to the
    user of a request that is over.
    """
    attribution = _current.get()
    if attribution is None or attribution.closed:
        return _MISSING
    return AttributionSnapshot(
        user_id=attribution.user_id,
        feature=attribution.feature,
        request_id=attribution.request_id,
        context_missing=False,
    )


def set_attribution(*, user_id: Any = _UNSET, feature: Any = _UNSET) -> None:
    """Change the attribution of the current request or job in place.

    Unlike `attribute(...)`, the change is seen by everything that shares the
    scope: the middleware after the endpoint returns, background tasks of the
    request, and sync endpoints that run in a worker thread.

    Raises LookupError when no scope is open.
    """
    attribution = _current.get()
    if attribution is None or attribution.closed:
        raise LookupError(
            "set_attribution() found no open request or job: add LLMCostMiddleware to the app, "
            "or wrap the code in `with llmcost_mw.attribute(...)`"
        )
    if user_id is not _UNSET:
        attribution.user_id = _stringify(user_id)
        attribution.user_resolver = None
    if feature is not _UNSET:
        attribution.feature = _stringify(feature)
        attribution.feature_resolver = None


def submit(executor: Executor, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """Submit `fn(*args, **kwargs)` to a thread pool, run in a copy of the caller's context.

    A plain `executor.submit` runs the function in the worker thread's own
    context, so its LLM calls are recorded with no attribution. This helper
    copies the context the way `asyncio.to_thread` does: the calls are billed
    to the current request or job, until that scope ends.

    Raises TypeError for a `ProcessPoolExecutor`, because a context cannot be
    sent to another process.
    """
    if isinstance(executor, ProcessPoolExecutor):
        raise TypeError(
            "submit() cannot copy the attribution context into another process: pass the user and "
            "feature as arguments and open `llmcost_mw.attribute(...)` inside the worker function"
        )
    context = contextvars.copy_context()
    return executor.submit(context.run, fn, *args, **kwargs)


def start_thread(
    target: Callable[..., object],
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    daemon: bool | None = None,
) -> threading.Thread:
    """Start a `threading.Thread` that runs `target` in a copy of the caller's context.

    The arguments are those of `threading.Thread`. A thread started directly
    begins with an empty context (CPython 3.11), so its LLM calls are
    recorded with `context_missing` set. Returns the started thread.
    """
    context = contextvars.copy_context()
    thread = threading.Thread(
        target=context.run, args=(target, *args), kwargs=dict(kwargs or {}), name=name, daemon=daemon
    )
    thread.start()
    return thread


class attribute:
    """Bill the LLM calls made inside a block or function to a user and feature.

    Works as a context manager and as a decorator of sync and async
    functions, inside HTTP requests (to refine the middleware's values) and
    outside them (jobs, scripts, workers). Values that are not given inherit
    from the enclosing scope. The previous scope is restored on exit.
    """

    def __init__(
        self,
        *,
        user_id: str | None = _UNSET,
        feature: str | None = _UNSET,
        request_id: str | None = _UNSET,
    ) -> None:
        self._overrides = {
            key: _stringify(value)
            for key, value in (("user_id", user_id), ("feature", feature), ("request_id", request_id))
            if value is not _UNSET
        }
        self._tokens: list[Token[Attribution | None]] = []

    def __enter__(self) -> Attribution:
        parent = _current.get()
        if parent is None or parent.closed:
            scope = Attribution(**self._overrides)
        else:
            scope = parent.child(**self._overrides)
        # A stack, so one instance can be entered again while it is active
        # (a decorated function that recurses).
        self._tokens.append(_current.set(scope))
        return scope

    def __exit__(self, *exc_info: object) -> None:
        token = self._tokens.pop()
        scope = _current.get()
        if scope is not None:
            scope.closed = True
        _current.reset(token)

    def __call__(self, func: F) -> F:
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with attribute(**self._overrides):
                    return await func(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with attribute(**self._overrides):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


def _stringify(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return str(value)
