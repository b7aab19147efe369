"""The FastAPI example under real uvicorn, with the real SDK talking to the local fake API."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from llmcost_mw.demo.fake_api import FakeAnthropicAPI, Reply
from llmcost_mw.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]

U7_USAGE = {
    "input_tokens": 3,
    "cache_creation_input_tokens": 12304,
    "cache_read_input_tokens": 0,
    "output_tokens": 550,
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def fake_api():
    with FakeAnthropicAPI() as api:
        yield api


@pytest.fixture
def example_app(fake_api, tmp_path):
    """Serve the example with uvicorn in a child process; stop it with SIGTERM to flush its rows."""
    port = _free_port()
    database_url = f"sqlite:///{tmp_path / 'costs.db'}"
    env = dict(
        os.environ,
        ANTHROPIC_BASE_URL=fake_api.base_url,
        ANTHROPIC_API_KEY="test-key",
        LLMCOST_DATABASE_URL=database_url,
        PYTHONPATH=str(REPO_ROOT),
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=tmp_path,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, "uvicorn exited during start-up"
        try:
            if requests.get(f"{base}/healthz", timeout=1).ok:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.1)

    def stop() -> Store:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        return Store(database_url)

    yield base, stop
    if server.poll() is None:
        server.kill()
        server.wait()


def _post(base: str, path: str, user: str, body: dict) -> requests.Response:
    response = requests.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {user}"}, timeout=30)
    response.raise_for_status()
    return response


def test_summarize_cache_write_case(example_app, fake_api):
    """A cache write is billed at the write rate only: 0.054399, not 0.091311."""
    base, stop = example_app
    fake_api.enqueue(Reply(usage=U7_USAGE))

    _post(base, "/summarize/doc-42", "u-7", {"text": "hello"})
    rows = stop().fetch_events()

    assert len(rows) == 1
    row = rows[0]
    assert row["user_id"] == "u-7"
    assert row["feature"] == "summarize"
    assert row["model"] == "claude-sonnet-4-6"
    assert row["cost_usd"] == pytest.approx(0.054399, abs=1e-12)
    assert row["prompt_tokens"] == 12307
    assert row["completion_tokens"] == 550
    assert row["cache_write_5m_tokens"] == 12304
    assert row["status"] == "ok"


def test_one_row_per_call_with_attribution(example_app):
    base, stop = example_app

    _post(base, "/chat", "u-3", {"message": "hi"})
    _post(base, "/summarize/doc-1", "u-7", {"text": "some text"})
    _post(base, "/chat", "u-5", {"message": "hello again"})
    rows = stop().fetch_events()

    assert [(row["user_id"], row["feature"]) for row in rows] == [
        ("u-3", "/chat"),
        ("u-7", "summarize"),
        ("u-5", "/chat"),
    ]
    assert len({row["request_id"] for row in rows}) == 3
    assert all(row["status"] == "ok" for row in rows)
    assert all(row["cost_usd"] > 0 for row in rows)


def test_tool_loop_request_writes_three_rows(example_app):
    base, stop = example_app

    answer = _post(base, "/agent/weather", "u-9", {"prompt": "Cycle to work tomorrow?"}).json()
    rows = stop().fetch_events()

    assert answer["calls"] == 3
    assert len(rows) == 3
    assert {row["user_id"] for row in rows} == {"u-9"}
    assert {row["feature"] for row in rows} == {"/agent/{task}"}
    assert len({row["request_id"] for row in rows}) == 1
    assert len({row["response_id"] for row in rows}) == 3


def test_metrics_endpoint_counts_cost(example_app, fake_api):
    base, stop = example_app
    fake_api.enqueue(Reply(usage=U7_USAGE))

    _post(base, "/summarize/doc-42", "u-7", {"text": "hello"})
    metrics = requests.get(f"{base}/metrics/", timeout=10).text
    stop()

    line = next(
        line for line in metrics.splitlines()
        if line.startswith("llmcost_cost_usd_total{") and 'feature="summarize"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == pytest.approx(0.054399, abs=1e-12)
    assert 'llmcost_calls_total{feature="summarize",model="claude-sonnet-4-6",provider="anthropic",status="ok"} 1.0' in metrics
    assert "user" not in metrics.split("llmcost_cost_usd_total", 1)[1].split("\n")[0]
