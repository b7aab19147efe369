"""Attribution across background tasks, threads, long-lived workers and streamed bodies.

Each case runs a real server on 127.0.0.1 (uvicorn for FastAPI, werkzeug
for Flask) whose endpoints call the real `anthropic` SDK against the local
fake API, and checks the rows written to a SQLite store in tmp_path.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import anthropic
import flask
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.testclient import TestClient

import llmcost_mw
from llmcost_mw import LLMCostMiddleware, attribute, set_attribution, start_thread, submit
from llmcost_mw.demo.fake_api import FakeAnthropicAPI
from llmcost_mw.flask_ext import LLMCostFlask
from propagation_helpers import (
    MODEL,
    acreate_message,
    bearer_user,
    create_message,
    next_completed,
    post,
    serve_asgi,
    serve_wsgi,
    written_rows,
)

KEPT = ["task", "to_thread", "run_in_threadpool", "submit", "start_thread"]
RAW = ["raw_submit", "raw_thread", "run_in_executor"]


@pytest.fixture
def fake_api():
    with FakeAnthropicAPI() as api:
        yield api


@pytest.fixture
def completed():
    """The attributions passed to the middleware's on_complete, in order."""
    return queue.Queue()


def build_fastapi_app(base_url: str, completed: queue.Queue) -> FastAPI:
    sync_client = anthropic.Anthropic(base_url=base_url, api_key="test-key", max_retries=0)
    # One thread, so that every job on it reuses the thread of the job before.
    executor = ThreadPoolExecutor(max_workers=1)
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["client"] = anthropic.AsyncAnthropic(base_url=base_url, api_key="test-key", max_retries=0)
        yield
        await state["client"].close()
        executor.shutdown(wait=True)
        sync_client.close()

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        LLMCostMiddleware,
        user_id=lambda connection: bearer_user(connection.headers.get("authorization")),
        on_complete=completed.put,
    )

    def async_client() -> anthropic.AsyncAnthropic:
        return state["client"]

    @app.post("/refine/{doc_id}")
    async def refine(doc_id: str):
        set_attribution(feature="summarize")
        await acreate_message(async_client())
        return {"doc_id": doc_id}

    @app.post("/refine-sync/{doc_id}")
    def refine_sync(doc_id: str):
        # FastAPI runs a sync endpoint in a worker thread.
        set_attribution(feature="summarize")
        create_message(sync_client)
        return {"doc_id": doc_id}

    @app.post("/background/async")
    async def background_from_async(tasks: BackgroundTasks):
        set_attribution(feature="report")
        tasks.add_task(create_message, sync_client)
        tasks.add_task(acreate_message, async_client())
        return {}

    @app.post("/background/sync")
    def background_from_sync(tasks: BackgroundTasks):
        set_attribution(feature="report")
        tasks.add_task(create_message, sync_client)
        tasks.add_task(acreate_message, async_client())
        return {}

    @app.post("/background/scoped")
    def background_scoped(tasks: BackgroundTasks):
        with attribute(feature="scoped"):
            create_message(sync_client)
            tasks.add_task(create_message, sync_client)
        return {}

    @app.post("/threads/{mechanism}")
    async def in_thread(mechanism: str):
        call = functools.partial(create_message, sync_client)
        if mechanism == "task":
            await asyncio.create_task(acreate_message(async_client()))
        elif mechanism == "to_thread":
            await asyncio.to_thread(call)
        elif mechanism == "run_in_threadpool":
            await run_in_threadpool(call)
        elif mechanism == "submit":
            await asyncio.wrap_future(submit(executor, call))
        elif mechanism == "raw_submit":
            await asyncio.wrap_future(executor.submit(call))
        elif mechanism == "run_in_executor":
            await asyncio.get_running_loop().run_in_executor(executor, call)
        elif mechanism == "start_thread":
            await asyncio.to_thread(start_thread(call).join)
        elif mechanism == "raw_thread":
            thread = threading.Thread(target=call)
            thread.start()
            await asyncio.to_thread(thread.join)
        return {"mechanism": mechanism}

    @app.post("/worker/start")
    async def start_workers():
        release_task = asyncio.Event()
        release_thread = threading.Event()

        async def task_job():
            await release_task.wait()
            await acreate_message(async_client())

        def thread_job():
            release_thread.wait(10)
            create_message(sync_client)

        state["task"] = asyncio.create_task(task_job())
        state["thread"] = start_thread(thread_job)
        state["release"] = (release_task, release_thread)
        return {}

    @app.post("/worker/release")
    async def release_workers():
        release_task, release_thread = state["release"]
        release_task.set()
        release_thread.set()
        await state["task"]
        await asyncio.to_thread(state["thread"].join, 10)
        await acreate_message(async_client())
        return {}

    @app.post("/stream")
    async def stream():
        async def body():
            async with async_client().messages.stream(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                async for text in events.text_stream:
                    yield text

        return StreamingResponse(body(), media_type="text/plain")

    @app.post("/stream-sync")
    def stream_sync(request: Request):
        # Starlette iterates a sync generator in a worker thread.
        def body():
            with sync_client.messages.stream(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                yield from events.text_stream

        return StreamingResponse(body(), media_type="text/plain")

    return app


def build_flask_app(base_url: str, completed: queue.Queue) -> tuple[flask.Flask, Callable[[], None]]:
    """Return the app and a function that closes its SDK client and executor."""
    client = anthropic.Anthropic(base_url=base_url, api_key="test-key", max_retries=0)
    executor = ThreadPoolExecutor(max_workers=1)
    state: dict[str, object] = {}

    app = flask.Flask(__name__)

    @app.before_request
    def authenticate():
        flask.g.user_id = bearer_user(flask.request.headers.get("Authorization"))

    LLMCostFlask(app, user_id=lambda request: flask.g.get("user_id"), on_complete=completed.put)

    @app.post("/refine/<doc_id>")
    def refine(doc_id):
        set_attribution(feature="summarize")
        create_message(client)
        return {"doc_id": doc_id}

    @app.post("/background")
    def background():
        set_attribution(feature="report")

        # Flask's counterpart of a background task: runs after the body is
        # sent, when the server closes the response.
        @flask.after_this_request
        def add_job(response):
            response.call_on_close(functools.partial(create_message, client))
            return response

        return {}

    @app.post("/threads/<mechanism>")
    def in_thread(mechanism):
        call = functools.partial(create_message, client)
        if mechanism == "submit":
            submit(executor, call).result(10)
        elif mechanism == "raw_submit":
            executor.submit(call).result(10)
        elif mechanism == "start_thread":
            start_thread(call).join(10)
        elif mechanism == "raw_thread":
            thread = threading.Thread(target=call)
            thread.start()
            thread.join(10)
        return {"mechanism": mechanism}

    @app.post("/worker/start")
    def start_worker():
        release = threading.Event()

        def job():
            release.wait(10)
            create_message(client)

        state["thread"] = start_thread(job)
        state["release"] = release
        return {}

    @app.post("/worker/release")
    def release_worker():
        state["release"].set()
        state["thread"].join(10)
        create_message(client)
        return {}

    @app.post("/stream")
    def stream():
        def body() -> Iterator[str]:
            with client.messages.stream(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                yield from events.text_stream

        return flask.Response(body(), mimetype="text/plain")

    @app.post("/stream-with-context")
    def stream_with_context():
        @flask.stream_with_context
        def body() -> Iterator[str]:
            # Reads the request context while the body is sent.
            yield f"user {flask.g.user_id}: "
            with client.messages.stream(
                model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                yield from events.text_stream

        return flask.Response(body(), mimetype="text/plain")

    def close() -> None:
        executor.shutdown(wait=True)
        client.close()

    return app, close


@pytest.fixture
def fastapi_server(fake_api, tracker, completed):
    with serve_asgi(build_fastapi_app(fake_api.base_url, completed)) as base:
        yield base


@pytest.fixture
def flask_server(fake_api, tracker, completed):
    app, close = build_flask_app(fake_api.base_url, completed)
    with serve_wsgi(app) as base:
        yield base
    close()


def _attribution_of(row: dict) -> tuple:
    return row["user_id"], row["feature"], row["context_missing"]


# --- the endpoint refines the feature -------------------------------------


@pytest.mark.parametrize("path", ["/refine/doc-1", "/refine-sync/doc-1"], ids=["async", "sync"])
def test_fastapi_refined_feature_seen(fastapi_server, tracker, completed, path):
    post(fastapi_server, path, user="alice", request_id=f"req{path}")
    final = next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [("alice", "summarize", False)]
    assert rows[0]["request_id"] == f"req{path}"
    assert final.feature == "summarize"
    assert final.user_id == "alice"
    assert final.closed is True


def test_flask_refined_feature_seen(flask_server, tracker, completed):
    post(flask_server, "/refine/doc-1", user="alice", request_id="req-refine")
    final = next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [("alice", "summarize", False)]
    assert rows[0]["request_id"] == "req-refine"
    assert final.feature == "summarize"
    assert final.user_id == "alice"
    assert final.closed is True


# --- background tasks --------------------------------------------------------


@pytest.mark.parametrize("path", ["/background/async", "/background/sync"], ids=["async", "sync"])
def test_fastapi_background_task_keeps_feature(fastapi_server, tracker, completed, path):
    post(fastapi_server, path, user="alice")
    next_completed(completed)  # after the background tasks have run
    rows = written_rows(tracker)

    # One sync and one async task; both are billed to the feature the endpoint set.
    assert [_attribution_of(row) for row in rows] == [("alice", "report", False)] * 2
    assert len({row["request_id"] for row in rows}) == 1


def test_fastapi_scoped_change_not_in_background(fastapi_server, tracker, completed):
    # `attribute(...)` only covers its block; a background task runs after
    # the block with the request's own attribution.
    post(fastapi_server, "/background/scoped", user="alice")
    next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [
        ("alice", "scoped", False),
        ("alice", "/background/scoped", False),
    ]


def test_flask_call_on_close_keeps_feature(flask_server, tracker, completed):
    post(flask_server, "/background", user="alice")
    final = next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [("alice", "report", False)]
    assert final.feature == "report"


# --- threads and executors ----------------------------------------------------


@pytest.mark.parametrize("mechanism", KEPT)
def test_fastapi_thread_helpers_keep_attribution(fastapi_server, tracker, completed, mechanism):
    post(fastapi_server, f"/threads/{mechanism}", user="alice")
    next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [("alice", "/threads/{mechanism}", False)]


@pytest.mark.parametrize("mechanism", RAW)
def test_fastapi_raw_threads_lose_attribution(fastapi_server, tracker, completed, mechanism):
    # bob's job runs first on the executor's only thread; alice's raw job
    # must not pick up bob, nor alice.
    post(fastapi_server, "/threads/submit", user="bob")
    post(fastapi_server, f"/threads/{mechanism}", user="alice")
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [
        ("bob", "/threads/{mechanism}", False),
        (None, None, True),
    ]
    assert rows[1]["request_id"] is None


@pytest.mark.parametrize("mechanism", ["submit", "start_thread"])
def test_flask_thread_helpers_keep_attribution(flask_server, tracker, completed, mechanism):
    post(flask_server, f"/threads/{mechanism}", user="alice")
    next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [("alice", "/threads/<mechanism>", False)]


@pytest.mark.parametrize("mechanism", ["raw_submit", "raw_thread"])
def test_flask_raw_threads_lose_attribution(flask_server, tracker, completed, mechanism):
    post(flask_server, "/threads/submit", user="bob")
    post(flask_server, f"/threads/{mechanism}", user="alice")
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [
        ("bob", "/threads/<mechanism>", False),
        (None, None, True),
    ]


# --- long-lived workers ---------------------------------------------------------


def test_fastapi_worker_outliving_request(fastapi_server, tracker, completed):
    post(fastapi_server, "/worker/start", user="alice")
    started = next_completed(completed)
    post(fastapi_server, "/worker/release", user="bob")
    next_completed(completed)
    rows = written_rows(tracker)

    assert started.closed is True
    # The asyncio task and the thread call after alice's request has ended.
    assert sorted(_attribution_of(row) for row in rows[:2]) == [(None, None, True)] * 2
    assert _attribution_of(rows[2]) == ("bob", "/worker/release", False)


def test_flask_worker_outliving_request(flask_server, tracker, completed):
    post(flask_server, "/worker/start", user="alice")
    next_completed(completed)
    post(flask_server, "/worker/release", user="bob")
    next_completed(completed)
    rows = written_rows(tracker)

    assert [_attribution_of(row) for row in rows] == [
        (None, None, True),
        ("bob", "/worker/release", False),
    ]


# --- streamed responses -------------------------------------------------------


@pytest.mark.parametrize("path", ["/stream", "/stream-sync"], ids=["async-generator", "sync-generator"])
def test_fastapi_streamed_body_keeps_attribution(fastapi_server, tracker, completed, path):
    body = post(fastapi_server, path, user="alice", request_id="req-stream").text
    next_completed(completed)
    rows = written_rows(tracker)

    assert body
    assert [_attribution_of(row) for row in rows] == [("alice", path, False)]
    assert rows[0]["request_id"] == "req-stream"
    assert rows[0]["status"] == "ok"


@pytest.mark.parametrize("path", ["/stream", "/stream-with-context"], ids=["plain", "stream_with_context"])
def test_flask_streamed_body_keeps_attribution(flask_server, tracker, completed, path):
    body = post(flask_server, path, user="alice", request_id="req-stream").text
    next_completed(completed)
    rows = written_rows(tracker)

    assert body
    assert [_attribution_of(row) for row in rows] == [("alice", path, False)]
    assert rows[0]["request_id"] == "req-stream"
    assert rows[0]["status"] == "ok"


def test_flask_stream_with_context_reads_g(flask_server, tracker, completed):
    body = post(flask_server, "/stream-with-context", user="carol").text
    next_completed(completed)

    assert body.startswith("user carol: ")


def test_helpers_exported():
    assert llmcost_mw.submit is submit
    assert llmcost_mw.start_thread is start_thread


def test_asgi_on_complete_after_error_and_failure(caplog):
    seen = []

    def record_then_fail(attribution):
        seen.append(attribution)
        raise RuntimeError("callback failed")

    async def failing(request):
        set_attribution(feature="failing-feature")
        raise RuntimeError("endpoint failed")

    app = Starlette(
        routes=[Route("/fail", failing)],
        middleware=[Middleware(LLMCostMiddleware, user_header="x-user", on_complete=record_then_fail)],
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/fail", headers={"x-user": "alice"})

    assert response.status_code == 500
    assert len(seen) == 1
    assert seen[0].feature == "failing-feature"
    assert seen[0].user_id == "alice"
    assert seen[0].closed is True
    assert "on_complete callback" in caplog.text
