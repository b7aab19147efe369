"""The Flask example under real WSGI servers, with the real SDK talking to the local fake API.

werkzeug's threaded server runs in a thread of the test process. gunicorn
(one worker, several threads) runs as a child process. It is stopped with
SIGTERM, and then all its rows must be in the store.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from llmcost_mw import current_tracker, uninstrument
from llmcost_mw.demo.fake_api import FakeAnthropicAPI, Reply
from llmcost_mw.demo.run import default_server, run_demo
from llmcost_mw.store import Store
from propagation_helpers import serve_wsgi

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
EXAMPLE = "examples.flask_app.app"
START_TIMEOUT_SECONDS = 30.0

U7_USAGE = {
    "input_tokens": 3,
    "cache_creation_input_tokens": 12304,
    "cache_read_input_tokens": 0,
    "output_tokens": 550,
}


@pytest.fixture
def fake_api():
    with FakeAnthropicAPI() as api:
        yield api


@pytest.fixture
def werkzeug_example(fake_api, tmp_path, monkeypatch):
    """Import the example with a store in tmp_path and serve it with werkzeug's threaded server.

    Yields the base URL and a function that writes the queue and returns the store.
    """
    database_url = f"sqlite:///{tmp_path / 'costs.db'}"
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_api.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("LLMCOST_DATABASE_URL", database_url)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    # A fresh import per test: the module instruments the SDK with the store it is given.
    sys.modules.pop(EXAMPLE, None)
    example = importlib.import_module(EXAMPLE)

    def stop() -> Store:
        tracker = current_tracker()
        if tracker is not None:
            tracker.recorder.close()
        return Store(database_url)

    try:
        with serve_wsgi(example.app, threaded=True) as base:
            yield base, stop
    finally:
        stop()
        uninstrument()
        example.client.close()
        sys.modules.pop(EXAMPLE, None)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# A gunicorn config whose post_fork hook gives the worker's recorder a flush
# interval of an hour, so that rows stay queued in memory until the worker
# exits. With the default 0.2 s, the writer thread would already have stored
# them, and the test could not show that the exit path writes the queue.
HOLD_QUEUE_CONFIG = """
def post_fork(server, worker):
    from llmcost_mw.recorder import Recorder

    Recorder.__init__.__kwdefaults__["flush_interval_seconds"] = 3600.0
"""


def _start_gunicorn(app: str, threads: int, fake_api: FakeAnthropicAPI, tmp_path: Path, *extra: str):
    """Start gunicorn with one worker; return the process, its base URL and the database URL."""
    port = _free_port()
    database_url = f"sqlite:///{tmp_path / 'costs.db'}"
    env = dict(
        os.environ,
        ANTHROPIC_BASE_URL=fake_api.base_url,
        ANTHROPIC_API_KEY="test-key",
        LLMCOST_DATABASE_URL=database_url,
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]),
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = [
        sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", str(threads),
        "--bind", f"127.0.0.1:{port}", "--log-level", "warning", *extra, app,
    ]
    server = subprocess.Popen(command, cwd=tmp_path, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        assert server.poll() is None, f"gunicorn exited during start-up with status {server.returncode}"
        try:
            if requests.get(f"{base}/healthz", timeout=1).ok:
                return server, base, database_url
        except (requests.ConnectionError, requests.Timeout):
            # gunicorn accepts connections before its worker has imported the app.
            pass
        assert time.monotonic() < deadline, f"gunicorn did not answer within {START_TIMEOUT_SECONDS:.0f} s"
        time.sleep(0.1)


def _stop_gunicorn(server: subprocess.Popen) -> int:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return server.returncode


@pytest.fixture
def gunicorn_example(fake_api, tmp_path):
    """Serve the example with `gunicorn -w 1 --threads 4`; yields the base URL and a stop function."""
    server, base, database_url = _start_gunicorn(f"{EXAMPLE}:app", 4, fake_api, tmp_path)

    def stop() -> tuple[int, Store]:
        return _stop_gunicorn(server), Store(database_url)

    yield base, stop
    if server.poll() is None:
        server.kill()
        server.wait()


def _post(
    base: str, path: str, user: str | None, body: dict, request_id: str | None = None
) -> requests.Response:
    headers = {}
    if user is not None:
        headers["Authorization"] = f"Bearer {user}"
    if request_id is not None:
        headers["x-request-id"] = request_id
    return requests.post(f"{base}{path}", json=body, headers=headers, timeout=30)


def _send_mixed_traffic(base: str) -> dict[str, tuple[str, str]]:
    """Send 16 requests, 4 at a time, from 4 users; return request id -> (user, feature) per row expected."""
    calls = []
    for n in range(16):
        user = f"u-{n % 4}"
        if n % 2:
            calls.append((f"req-{n}", user, "/chat", {"message": f"question {n}"}, "/chat"))
        else:
            calls.append((f"req-{n}", user, f"/summarize/doc-{n}", {"text": f"document {n}"}, "summarize"))

    def send(call):
        request_id, user, path, body, _feature = call
        response = _post(base, path, user, body, request_id=request_id)
        response.raise_for_status()
        return response.text

    with ThreadPoolExecutor(max_workers=4) as pool:
        bodies = list(pool.map(send, calls))
    assert all(bodies)
    return {request_id: (user, feature) for request_id, user, _path, _body, feature in calls}


# --- werkzeug, threaded ----------------------------------------------------------


def test_werkzeug_summarize_cache_write(werkzeug_example, fake_api):
    """A cache write is billed at the write rate only: 0.054399, not 0.091311."""
    base, stop = werkzeug_example
    fake_api.enqueue(Reply(usage=U7_USAGE))

    _post(base, "/summarize/doc-42", "u-7", {"text": "hello"}).raise_for_status()
    rows = stop().fetch_events()

    assert len(rows) == 1
    assert rows[0]["user_id"] == "u-7"
    assert rows[0]["feature"] == "summarize"
    assert rows[0]["cost_usd"] == pytest.approx(0.054399, abs=1e-12)
    assert rows[0]["cache_write_5m_tokens"] == 12304


def test_werkzeug_one_row_per_call(werkzeug_example):
    base, stop = werkzeug_example

    for path, user, body in [
        ("/chat", "u-3", {"message": "hi"}),
        ("/summarize/doc-1", "u-7", {"text": "some text"}),
        ("/translate", "u-2", {"text": "bonjour"}),
        ("/chat", "u-5", {"message": "hello again"}),
    ]:
        _post(base, path, user, body).raise_for_status()
    rows = stop().fetch_events()

    assert [(row["user_id"], row["feature"]) for row in rows] == [
        ("u-3", "/chat"),
        ("u-7", "summarize"),
        ("u-2", "/translate"),
        ("u-5", "/chat"),
    ]
    assert rows[2]["model"] == "claude-opus-4-8"
    assert len({row["request_id"] for row in rows}) == 4
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["cost_usd"] > 0 for row in rows)


def test_werkzeug_tool_loop_three_rows(werkzeug_example):
    base, stop = werkzeug_example

    answer = _post(base, "/agent/weather", "u-9", {"prompt": "Cycle to work tomorrow?"}).json()
    rows = stop().fetch_events()

    assert answer["calls"] == 3
    assert len(rows) == 3
    assert {row["user_id"] for row in rows} == {"u-9"}
    assert {row["feature"] for row in rows} == {"/agent/<task>"}
    assert len({row["request_id"] for row in rows}) == 1


def test_werkzeug_missing_bearer_rejected(werkzeug_example, fake_api):
    base, stop = werkzeug_example

    response = _post(base, "/chat", None, {"message": "hi"})
    rows = stop().fetch_events()

    assert response.status_code == 401
    assert rows == []
    assert fake_api.requests_to("/v1/messages") == []


def test_werkzeug_concurrent_users_not_mixed(werkzeug_example):
    base, stop = werkzeug_example

    expected = _send_mixed_traffic(base)
    rows = stop().fetch_events()

    assert len(rows) == 16
    assert {row["request_id"]: (row["user_id"], row["feature"]) for row in rows} == expected


# --- gunicorn, one worker with threads -----------------------------------------------


def test_gunicorn_rows_complete_after_sigterm(fake_api, tmp_path):
    config = tmp_path / "hold_queue.py"
    config.write_text(HOLD_QUEUE_CONFIG)
    server, base, database_url = _start_gunicorn(
        f"{EXAMPLE}:app", 4, fake_api, tmp_path, "--config", str(config)
    )
    try:
        expected = _send_mixed_traffic(base)
        agent = _post(base, "/agent/weather", "u-9", {"prompt": "Umbrella?"}, request_id="req-agent").json()
        store = Store(database_url)
        rows_before_sigterm = store.count_events()
        returncode = _stop_gunicorn(server)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    rows = store.fetch_events()

    assert rows_before_sigterm == 0
    assert returncode == 0
    assert agent["calls"] == 3
    assert len(rows) == 16 + 3
    by_request = {row["request_id"]: (row["user_id"], row["feature"]) for row in rows}
    assert by_request == expected | {"req-agent": ("u-9", "/agent/<task>")}
    assert all(row["status"] == "ok" for row in rows)


def test_gunicorn_metrics_count_cost(gunicorn_example, fake_api):
    base, stop = gunicorn_example
    fake_api.enqueue(Reply(usage=U7_USAGE))

    _post(base, "/summarize/doc-42", "u-7", {"text": "hello"}).raise_for_status()
    metrics = requests.get(f"{base}/metrics", timeout=10).text
    stop()

    line = next(
        line for line in metrics.splitlines()
        if line.startswith("llmcost_cost_usd_total{") and 'feature="summarize"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(0.054399, abs=1e-12)
    calls_line = (
        'llmcost_calls_total{feature="summarize",model="claude-sonnet-4-6",'
        'provider="anthropic",status="ok"} 1.0'
    )
    assert calls_line in metrics
    assert "user" not in line


def test_gunicorn_reused_thread_anonymous(fake_api, tmp_path):
    # One thread, so every request reuses the thread of the one before it.
    server, base, database_url = _start_gunicorn(
        "propagation_helpers:make_thread_reuse_app()", 1, fake_api, tmp_path
    )
    try:
        threads = []
        for user in ["alice", None, "bob", None]:
            headers = {"Authorization": f"Bearer {user}"} if user else {}
            response = requests.post(f"{base}/call", headers=headers, timeout=30)
            response.raise_for_status()
            threads.append(response.text)
        returncode = _stop_gunicorn(server)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    rows = Store(database_url).fetch_events()

    assert returncode == 0
    assert len(set(threads)) == 1
    assert [row["user_id"] for row in rows] == ["alice", None, "bob", None]
    assert [row["context_missing"] for row in rows] == [False] * 4


# --- the offline demo on the Flask example ---------------------------------------------


def test_default_server_per_app():
    assert default_server("examples.flask_app.app:app") == "gunicorn"
    assert default_server("examples.fastapi_app.app:app") == "uvicorn"
    assert default_server("examples.flask_application:app") == "uvicorn"


def test_demo_serves_flask_example(tmp_path, capsys):
    database = tmp_path / "demo.db"

    status = run_demo(database_path=str(database), app=f"{EXAMPLE}:app")
    output = capsys.readouterr().out
    rows = Store(f"sqlite:///{database}").fetch_events()

    assert status == 0
    assert "(gunicorn, pid" in output
    assert "Cost per feature, last 7 days" in output
    assert len(rows) == 49
    assert {row["feature"] for row in rows} == {"summarize", "/chat", "/agent/<task>", "/translate"}
    assert sum(1 for row in rows if row["user_id"] == "u-loop") == 40
    assert all(row["context_missing"] is False for row in rows)
