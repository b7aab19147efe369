"""`llmcost demo`: the whole loop offline, on this machine only.

Starts a local fake Messages API and a local ntfy receiver on 127.0.0.1.
Serves the example app in a child process pointed at the fake API: the
FastAPI app with uvicorn, or the Flask app with gunicorn. Drives traffic
through it (one user who loops, one request over $0.50, a tool-use loop,
streamed chat), stops the app so that it writes its queue, runs one watcher
pass, and prints the notifications and the report.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import sqlalchemy as sa

from ..alerts import NtfyNotifier, Watcher, builtin_rules
from ..errors import ConfigurationError
from ..report import build_report, format_report
from ..store import Store, meta
from .fake_api import FakeAnthropicAPI
from .ntfy_receiver import NtfyReceiver

__all__ = ["run_demo"]

STARTUP_TIMEOUT_SECONDS = 30.0
DEMO_TOPIC = "llmcost-demo"

# Sizes chosen for the fake API's estimate of 4 characters per token:
# 200,000 characters are 50,000 input tokens, $0.15 on a $3 model, so 40
# requests put one user well over the $5 hourly limit; 440,000 characters on a
# $5 model are one request over $0.50.
LOOPING_DOCUMENT = "quarterly figures and notes " * 7_143
LARGE_DOCUMENT = "a long contract clause " * 19_131
LOOP_REQUESTS = 40

SERVERS = ("uvicorn", "gunicorn")
# A WSGI app needs a WSGI server; these example modules are served with gunicorn by default.
WSGI_EXAMPLE_PACKAGE = "examples.flask_app"


def run_demo(
    *,
    database_path: str = "llmcost-demo.db",
    app: str = "examples.fastapi_app.app:app",
    keep: bool = False,
    server: str | None = None,
) -> int:
    """Run the demo; `server` is "uvicorn" or "gunicorn", or None to choose from `app`."""
    app_root = _find_app_root(app)
    server_name = server or default_server(app)
    _check_server(server_name)
    database = Path(database_path).resolve()
    if database.is_dir():
        raise ConfigurationError(f"--database {database_path!r} is a directory; give a file path for the demo's SQLite store")
    if not keep and database.exists():
        if not _is_demo_database(database):
            raise ConfigurationError(
                f"refusing to replace {database}: it is not a store made by `llmcost demo`; "
                "pass another --database, or --keep to add to it"
            )
        for suffix in ("", "-wal", "-shm", ".spill.jsonl"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
    database_url = f"sqlite:///{database}"

    with FakeAnthropicAPI() as fake_api, NtfyReceiver() as receiver:
        port = _free_port()
        _say(f"fake Anthropic API on {fake_api.base_url}; ntfy receiver on {receiver.url}")
        server = _start_app(app, app_root, port, fake_api.base_url, database_url, server_name)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_up(base, server)
            _say(f"example app serving on {base} ({server_name}, pid {server.pid})")
            metrics_line = _drive_traffic(base)
        finally:
            _stop_app(server)
        _say(f"app stopped; {metrics_line}")

        store = Store(database_url)
        _mark_demo_database(store)
        _say(f"{store.count_events()} cost rows in {database}")

        notifier = NtfyNotifier(receiver.topic_url(DEMO_TOPIC))
        watcher = Watcher(store, builtin_rules(), notifier)
        watcher.run_once()
        _print_notifications(receiver.messages)
        print(format_report(build_report(store)))
        store.dispose()
    _say(f"try: llmcost report --database-url {database_url}")
    return 0


def default_server(app: str) -> str:
    """Return "gunicorn" for an app in the Flask example package, else "uvicorn"."""
    module = app.partition(":")[0]
    if module == WSGI_EXAMPLE_PACKAGE or module.startswith(WSGI_EXAMPLE_PACKAGE + "."):
        return "gunicorn"
    return "uvicorn"


def _check_server(server: str) -> None:
    if server not in SERVERS:
        raise ConfigurationError(f"invalid server {server!r}: use one of {', '.join(SERVERS)}")
    if importlib.util.find_spec(server) is None:
        raise ConfigurationError(
            f"{server} is not installed: install it (pip install {server}) or choose the other --server"
        )


_DEMO_MARKER = "created_by_llmcost_demo"


def _is_demo_database(path: Path) -> bool:
    """Return True when `path` is an SQLite store that an earlier demo run marked as its own."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT value FROM llmcost_meta WHERE key = ?", (_DEMO_MARKER,)).fetchone()
    except sqlite3.Error:
        return False
    return row is not None


def _mark_demo_database(store: Store) -> None:
    with store.write() as conn:
        conn.execute(sa.delete(meta).where(meta.c.key == _DEMO_MARKER))
        conn.execute(sa.insert(meta).values(key=_DEMO_MARKER, value="true"))


def _find_app_root(app: str) -> Path:
    """Return the directory from which `app` imports: the working directory or the repository root."""
    module = app.partition(":")[0]
    relative = Path(*module.split(".")).with_suffix(".py")
    candidates = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / relative).is_file():
            return root
    raise ConfigurationError(
        f"cannot find the app module {module!r} ({relative}) in {candidates[0]}; run `llmcost demo` from the "
        "llmcost-mw repository checkout, or pass --app module:attribute for an app on the import path"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_app(
    app: str, app_root: Path, port: int, api_url: str, database_url: str, server: str = "uvicorn"
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.update(
        ANTHROPIC_BASE_URL=api_url,
        ANTHROPIC_API_KEY="offline-demo-key",
        LLMCOST_DATABASE_URL=database_url,
        PYTHONPATH=os.pathsep.join(filter(None, [str(app_root), env.get("PYTHONPATH")])),
    )
    # The demo must never reach a real provider, whatever the user's shell has set.
    for name in ("ANTHROPIC_AUTH_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    if server == "gunicorn":
        # Several threads in one worker: the case where a request must not
        # inherit the attribution of the one before it on the same thread.
        command = [
            sys.executable, "-m", "gunicorn", "--workers", "1", "--threads", "4",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", app,
        ]
    else:
        command = [
            sys.executable, "-m", "uvicorn", app,
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        ]
    return subprocess.Popen(command, cwd=app_root, env=env)


def _wait_until_up(base: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ConfigurationError(f"the example app exited with status {server.returncode} during start-up")
        try:
            if requests.get(f"{base}/healthz", timeout=1).ok:
                return
        # gunicorn accepts connections before its worker has imported the
        # app, so a probe may time out instead of being refused.
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.1)
    raise ConfigurationError(f"the example app did not answer on {base} within {STARTUP_TIMEOUT_SECONDS:.0f} s")


def _stop_app(server: subprocess.Popen[bytes]) -> None:
    # SIGTERM: uvicorn shuts down cleanly, and gunicorn's worker exits
    # normally; either way the recorder writes its queue before the process ends.
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _drive_traffic(base: str) -> str:
    session = requests.Session()

    def post(path: str, user: str, body: dict[str, Any]) -> requests.Response:
        response = session.post(f"{base}{path}", json=body, headers={"Authorization": f"Bearer {user}"}, timeout=60)
        response.raise_for_status()
        return response

    steps: list[tuple[str, Callable[[], object]]] = [
        ("u-7 summarises two documents", lambda: [
            post("/summarize/doc-1", "u-7", {"text": "Minutes of the planning meeting. " * 50}),
            post("/summarize/doc-2", "u-7", {"text": "Incident review for the billing outage. " * 80}),
        ]),
        ("u-3 chats three times (streamed)", lambda: [
            post("/chat", "u-3", {"message": f"Question {n}: how do I rotate my API key?"}) for n in range(3)
        ]),
        ("u-9 runs the agent: one request, a tool-use loop", lambda: post(
            "/agent/weather", "u-9", {"prompt": "Should I cycle to work tomorrow in Lyon?"}
        )),
        (f"u-loop re-sends a large document {LOOP_REQUESTS} times", lambda: [
            post("/summarize/big-report", "u-loop", {"text": LOOPING_DOCUMENT}) for _ in range(LOOP_REQUESTS)
        ]),
        ("u-2 translates one very large document", lambda: post("/translate", "u-2", {"text": LARGE_DOCUMENT})),
    ]
    for description, step in steps:
        _say(description)
        step()

    metrics = session.get(f"{base}/metrics/", timeout=10).text
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llmcost_cost_usd_total{")
    )
    return f"/metrics reported llmcost_cost_usd_total summing to ${total:.4f}"


def _print_notifications(messages: list[Any]) -> None:
    print()
    print(f"ntfy notifications received: {len(messages)}")
    for message in messages:
        print(f"  [{getattr(message, 'priority', '')}] {message.title}")
        for line in str(message.message).splitlines():
            print(f"      {line}")
    print()


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)
