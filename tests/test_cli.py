"""The `llmcost` command as a user runs it: a real process, environment variables, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from llmcost_mw.demo.ntfy_receiver import NtfyReceiver
from llmcost_mw.events import CostEvent, utcnow
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET_TOPIC = "alerts-7f3c9e2b1d"
SECRET_TOKEN = "tk_secret_5d8a"


def _llmcost(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "llmcost_mw.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO_ROOT,
        timeout=timeout,
    )


@pytest.fixture
def spend_store(tmp_path):
    """A store where user u-1 spent $6 in the last hour and one request cost $0.82."""
    url = f"sqlite:///{tmp_path / 'costs.db'}"
    store = Store(url)
    now = utcnow()
    rows = [
        CostEvent(
            provider="anthropic",
            model="claude-sonnet-4-6",
            usage=Usage(input_tokens=1000, output_tokens=100),
            cost_usd=Decimal("0.30"),
            feature="chat",
            user_id="u-1",
            ts=now - timedelta(minutes=minute),
        ).to_row()
        for minute in range(1, 21)
    ]
    rows.append(
        CostEvent(
            provider="anthropic",
            model="claude-opus-4-8",
            usage=Usage(input_tokens=150_000, output_tokens=2000),
            cost_usd=Decimal("0.82"),
            feature="translate",
            user_id="u-2",
            ts=now - timedelta(minutes=5),
        ).to_row()
    )
    store.insert_events(rows)
    store.dispose()
    return url


def test_watch_once_pages_through_ntfy(spend_store):
    with NtfyReceiver() as receiver:
        env = {
            "LLMCOST_DATABASE_URL": spend_store,
            "LLMCOST_NTFY_URL": receiver.topic_url(SECRET_TOPIC),
            "LLMCOST_NTFY_TOKEN": SECRET_TOKEN,
        }
        first = _llmcost("watch", "--once", env=env)
        second = _llmcost("watch", "--once", env=env)
        messages = list(receiver.messages)

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    titles = sorted(message.title for message in messages)
    assert len(titles) == 2
    assert "u-1" in titles[1] or "u-1" in titles[0]
    assert {message.topic for message in messages} == {SECRET_TOPIC}
    assert all(message.authorization == f"Bearer {SECRET_TOKEN}" for message in messages)
    for output in (first.stderr, first.stdout, second.stderr, second.stdout):
        assert SECRET_TOPIC not in output
        assert SECRET_TOKEN not in output
    assert "alert watcher started" in first.stderr


def test_watch_without_ntfy_url_is_config_error(spend_store):
    env = {"LLMCOST_DATABASE_URL": spend_store, "LLMCOST_NTFY_URL": ""}

    result = _llmcost("watch", "--once", env=env)

    assert result.returncode == 2
    assert "LLMCOST_NTFY_URL is not set" in result.stderr
    assert "--dry-run" in result.stderr


def test_watch_dry_run_prints_alerts(spend_store):
    result = _llmcost("watch", "--once", "--dry-run", env={"LLMCOST_DATABASE_URL": spend_store})

    assert result.returncode == 0, result.stderr
    assert "u-1" in result.stdout + result.stderr


@pytest.mark.parametrize("interval", ["abc", "0", "-5"], ids=["text", "zero", "negative"])
def test_watch_rejects_bad_interval(spend_store, interval):
    env = {"LLMCOST_DATABASE_URL": spend_store, "LLMCOST_POLL_SECONDS": interval}

    result = _llmcost("watch", "--dry-run", env=env)

    assert result.returncode == 2
    assert f"invalid poll interval {interval!r}" in result.stderr


def test_bad_database_url_is_config_error():
    result = _llmcost("report", "--database-url", "mysql://user:hunter2@db/costs")

    assert result.returncode == 2
    assert "unsupported database 'mysql'" in result.stderr
    assert "hunter2" not in result.stderr


def test_report_prints_three_tables(spend_store):
    result = _llmcost("report", env={"LLMCOST_DATABASE_URL": spend_store})

    assert result.returncode == 0, result.stderr
    assert "Cost per feature, last 7 days" in result.stdout
    assert "Top 20 users by cost, last 7 days" in result.stdout
    assert "Daily cost per feature, last 30 days" in result.stdout
    assert re.search(r"^u-1\s+20\s+6\.0000$", result.stdout, re.MULTILINE)
    assert re.search(r"^u-2\s+1\s+0\.8200$", result.stdout, re.MULTILINE)


def test_demo_runs_offline(tmp_path):
    database = tmp_path / "demo.db"

    result = _llmcost("demo", "--database", str(database), timeout=300)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "ntfy notifications received: 2" in result.stdout
    assert "User u-loop spent" in result.stdout
    assert "Request cost $0.55" in result.stdout
    assert "Cost per feature, last 7 days" in result.stdout
    assert "49 cost rows" in result.stdout
    store = Store(f"sqlite:///{database}")
    rows = store.fetch_events()
    assert {row["user_id"] for row in rows} == {"u-7", "u-3", "u-9", "u-loop", "u-2"}
    assert all(row["cost_usd"] is not None for row in rows)
    assert len([row for row in rows if row["feature"] == "/agent/{task}"]) == 3


def test_demo_keeps_foreign_file(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("precious notes\n")

    result = _llmcost("demo", "--database", str(victim))

    assert result.returncode == 2
    assert "refusing to replace" in result.stderr
    assert victim.read_text() == "precious notes\n"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:pw@127.0.0.1:notaport/db", "invalid database URL 'postgresql://u:***@127.0.0.1:notaport/db'"),
        ("postgresql+asyncpg://u@127.0.0.1/db", "pip install 'llmcost-mw[postgres]'"),
    ],
    ids=["port-not-a-number", "driver-missing"],
)
def test_bad_store_url_is_config_error(url, message):
    result = _llmcost("report", env={"LLMCOST_DATABASE_URL": url})

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_store_is_one_line(tmp_path):
    result = _llmcost("report", "--database-url", f"sqlite:///{tmp_path}")

    assert result.returncode == 1
    assert "failed: unable to open database file" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["report", "--top", "-2"], ["prune", "--older-than", "99999999"], ["prune", "--older-than", "0"]],
    ids=["negative-top", "huge-retention", "zero-retention"],
)
def test_bad_numbers_are_config_errors(tmp_path, args):
    result = _llmcost(*args, "--database-url", f"sqlite:///{tmp_path / 'costs.db'}")

    assert result.returncode == 2
    assert "invalid --" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"], ids=["bare", "empty", "memory"])
def test_in_memory_store_is_rejected(url):
    result = _llmcost("report", "--database-url", url)

    assert result.returncode == 2
    assert "in-memory SQLite store" in result.stderr
