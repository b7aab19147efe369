"""Real servers on 127.0.0.1 for the middleware tests: uvicorn and werkzeug, each in a thread."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import requests
import uvicorn
from werkzeug.serving import make_server

from llmcost_mw.context import Attribution

MODEL = "claude-sonnet-4-6"
START_TIMEOUT_SECONDS = 10.0
COMPLETE_TIMEOUT_SECONDS = 10.0


@contextmanager
def serve_asgi(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn, lifespan included; yield its base URL.

    On exit the server shuts down, so the middleware's lifespan hook writes
    the recorder's queue before the test reads the rows.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on port {port} within {START_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(START_TIMEOUT_SECONDS)
        listener.close()


@contextmanager
def serve_wsgi(app: Any, *, threaded: bool = True) -> Iterator[str]:
    """Serve a WSGI app with werkzeug's server; yield its base URL.

    `threaded=True` handles each request on a new thread. `threaded=False`
    handles every request on the one serving thread, so each request reuses
    the thread of the one before.
    """
    server = make_server("127.0.0.1", 0, app, threaded=threaded)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(START_TIMEOUT_SECONDS)


def post(base: str, path: str, user: str | None = None, request_id: str | None = None) -> requests.Response:
    """POST to the app as `user` (a Bearer token) with an optional x-request-id; fail on an error status."""
    headers = {}
    if user is not None:
        headers["Authorization"] = f"Bearer {user}"
    if request_id is not None:
        headers["x-request-id"] = request_id
    response = requests.post(f"{base}{path}", headers=headers, timeout=30)
    response.raise_for_status()
    return response


def bearer_user(authorization: str | None) -> str | None:
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[7:].strip() or None


def create_message(client: anthropic.Anthropic) -> None:
    client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hello"}])


async def acreate_message(client: anthropic.AsyncAnthropic) -> None:
    await client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "hello"}])


def next_completed(completed: queue.Queue[Attribution]) -> Attribution:
    """Wait for the middleware's next on_complete call, which comes after the client has its response."""
    return completed.get(timeout=COMPLETE_TIMEOUT_SECONDS)


def written_rows(tracker: Any) -> list[dict[str, Any]]:
    """Wait until the recorder has written its queue; return every row, oldest first."""
    assert tracker.recorder.flush(timeout_seconds=10), "the recorder did not write its queue within 10 s"
    return tracker.recorder.store.fetch_events()


def make_thread_reuse_app() -> Any:
    """Build a WSGI app for gunicorn (`propagation_helpers:make_thread_reuse_app()`).

    Each request makes one SDK call and returns the id of the thread that
    served it. The user is the Bearer token, and a request without one is
    anonymous. Reads ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY and
    LLMCOST_DATABASE_URL from the environment.
    """
    import os
    import threading

    import llmcost_mw

    llmcost_mw.instrument(database_url=os.environ["LLMCOST_DATABASE_URL"])
    client = anthropic.Anthropic(max_retries=0)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        create_message(client)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(threading.get_ident()).encode()]

    return llmcost_mw.LLMCostWSGIMiddleware(
        app, user_id=lambda environ: bearer_user(environ.get("HTTP_AUTHORIZATION"))
    )
