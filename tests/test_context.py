"""The attribution scope: `attribute`, `set_attribution` and `capture`."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading

import pytest

from llmcost_mw.context import attribute, capture, current_attribution, set_attribution


def test_capture_outside_scope_missing():
    snapshot = capture()

    assert snapshot.context_missing is True
    assert snapshot.user_id is None
    assert snapshot.feature is None


def test_attribute_context_manager():
    with attribute(user_id="u1", feature="summarize"):
        snapshot = capture()

    assert snapshot.user_id == "u1"
    assert snapshot.feature == "summarize"
    assert snapshot.context_missing is False
    assert snapshot.request_id


def test_attribute_restores_none_on_exit():
    with attribute(user_id="u1"):
        pass

    assert current_attribution() is None
    assert capture().context_missing is True


def test_attribute_sync_decorator():
    @attribute(user_id="u2", feature="report")
    def job():
        return capture()

    snapshot = job()

    assert snapshot.user_id == "u2"
    assert snapshot.feature == "report"
    assert current_attribution() is None


def test_attribute_async_decorator():
    @attribute(user_id="u3", feature="chat")
    async def job():
        await asyncio.sleep(0)
        return capture()

    snapshot = asyncio.run(job())

    assert snapshot.user_id == "u3"
    assert snapshot.feature == "chat"


def test_async_decorator_keeps_coroutine_function():
    @attribute(feature="chat")
    async def job():
        return None

    assert inspect.iscoroutinefunction(job)


def test_decorator_recursion_restores_scope():
    scope = attribute(feature="outer")

    @scope
    def recurse(depth):
        if depth:
            return recurse(depth - 1)
        return capture()

    snapshot = recurse(3)

    assert snapshot.feature == "outer"
    assert current_attribution() is None


def test_nested_inherits_and_restores():
    with attribute(user_id="outer-user", feature="outer"):
        outer_request_id = capture().request_id
        with attribute(feature="inner"):
            inner = capture()
        after = capture()

    assert inner.user_id == "outer-user"
    assert inner.feature == "inner"
    assert inner.request_id == outer_request_id
    assert after.feature == "outer"
    assert after.user_id == "outer-user"
    assert after.context_missing is False


def test_nested_exit_leaves_outer_open():
    with attribute(user_id="outer-user") as outer:
        with attribute(user_id="inner-user"):
            pass
        assert outer.closed is False
    assert outer.closed is True


def test_attribute_none_clears_inherited():
    with attribute(user_id="outer-user"):
        with attribute(user_id=None):
            snapshot = capture()

    assert snapshot.user_id is None


def test_attribute_stringifies_values():
    with attribute(user_id=42):
        snapshot = capture()

    assert snapshot.user_id == "42"


def test_set_attribution_mutates_in_place():
    with attribute(user_id="before", feature="f") as scope:
        set_attribution(user_id="after")
        snapshot = capture()

    assert snapshot.user_id == "after"
    assert snapshot.feature == "f"
    assert scope.user_id == "after"


def test_set_attribution_seen_by_thread():
    # A worker thread that copied the context reads the change, because the
    # scope object is shared, not copied.
    seen = {}
    with attribute(feature="f"):
        context = contextvars.copy_context()
        set_attribution(user_id="late-user")
        thread = threading.Thread(target=lambda: seen.update(snapshot=context.run(capture)))
        thread.start()
        thread.join()

    assert seen["snapshot"].user_id == "late-user"


def test_set_attribution_outside_scope_raises():
    with pytest.raises(LookupError, match="attribute"):
        set_attribution(user_id="u")


def test_set_attribution_after_close_raises():
    with attribute(user_id="u"):
        context = contextvars.copy_context()

    with pytest.raises(LookupError):
        context.run(set_attribution, user_id="v")


def test_closed_scope_captures_missing():
    with attribute(user_id="u", feature="f"):
        context = contextvars.copy_context()

    snapshot = context.run(capture)

    assert snapshot.context_missing is True
    assert snapshot.user_id is None
    assert snapshot.feature is None


def test_thread_outliving_scope_not_billed():
    started = threading.Event()
    release = threading.Event()
    seen = {}

    def worker():
        started.set()
        release.wait(5)
        seen["snapshot"] = capture()

    with attribute(user_id="u"):
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(worker,))
        thread.start()
        started.wait(5)
    release.set()
    thread.join(5)

    assert seen["snapshot"].context_missing is True
    assert seen["snapshot"].user_id is None


def test_attribute_after_closed_parent_starts_fresh():
    with attribute(user_id="old-user", feature="old"):
        context = contextvars.copy_context()

    def inner():
        with attribute(feature="new"):
            return capture()

    snapshot = context.run(inner)

    assert snapshot.user_id is None
    assert snapshot.feature == "new"
    assert snapshot.context_missing is False


def test_tasks_keep_their_own_scope():
    async def job(user):
        with attribute(user_id=user):
            await asyncio.sleep(0.01)
            return capture().user_id

    async def main():
        return await asyncio.gather(job("a"), job("b"), job("c"))

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_request_id_stable_within_scope():
    with attribute(user_id="u"):
        first = capture().request_id
        second = capture().request_id

    assert first == second
    assert len(first) == 32


def test_explicit_request_id_kept():
    with attribute(request_id="req-1"):
        snapshot = capture()

    assert snapshot.request_id == "req-1"
