"""Upgrading stores written by earlier versions, in place and without losing rows."""

from __future__ import annotations

import sqlite3
from datetime import datetime

import pytest

from llmcost_mw.events import CostEvent
from llmcost_mw.store import SCHEMA_VERSION, Store
from llmcost_mw.usage import Usage

# The schema a plain cost logger writes: the columns hand-written queries use.
PLAIN_LOG_DDL = """
CREATE TABLE cost_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    feature TEXT,
    user_id TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cost_usd REAL,
    latency_ms REAL
);
"""

# Schema version 1, as the first release of this package created it in SQLite.
VERSION_1_DDL = """
CREATE TABLE cost_events (
    id INTEGER NOT NULL, event_id VARCHAR(32) NOT NULL, ts DATETIME NOT NULL,
    provider VARCHAR(64) NOT NULL, model VARCHAR(255) NOT NULL, request_model VARCHAR(255),
    feature VARCHAR(255), user_id VARCHAR(255), request_id VARCHAR(64), response_id VARCHAR(255),
    status VARCHAR(16) NOT NULL, error_type VARCHAR(128), prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, input_tokens INTEGER NOT NULL,
    cache_write_5m_tokens INTEGER NOT NULL, cache_write_1h_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, reasoning_tokens INTEGER NOT NULL,
    web_search_requests INTEGER NOT NULL, web_fetch_requests INTEGER NOT NULL, cost_usd FLOAT,
    unpriced BOOLEAN NOT NULL, price_version VARCHAR(32), price_id VARCHAR(255), service_tier VARCHAR(32),
    latency_ms FLOAT NOT NULL, context_missing BOOLEAN NOT NULL, flags VARCHAR(255),
    PRIMARY KEY (id), CONSTRAINT uq_cost_events_event_id UNIQUE (event_id)
);
CREATE INDEX ix_cost_events_user_ts ON cost_events (user_id, ts);
CREATE INDEX ix_cost_events_ts ON cost_events (ts);
CREATE INDEX ix_cost_events_feature_ts ON cost_events (feature, ts);
CREATE INDEX ix_cost_events_cost_ts ON cost_events (ts, cost_usd);
CREATE UNIQUE INDEX uq_cost_events_response_id ON cost_events (response_id);
CREATE TABLE alert_state (
    rule VARCHAR(128) NOT NULL, entity VARCHAR(255) NOT NULL, last_fired_at DATETIME NOT NULL,
    window_key VARCHAR(64), value FLOAT, PRIMARY KEY (rule, entity)
);
CREATE TABLE llmcost_meta ("key" VARCHAR(64) NOT NULL, value TEXT NOT NULL, PRIMARY KEY ("key"));
INSERT INTO llmcost_meta VALUES ('schema_version', '1');
"""


def _schema_version(path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT value FROM llmcost_meta WHERE key = 'schema_version'").fetchone()[0]


def test_plain_log_is_adopted(tmp_path):
    path = tmp_path / "plain.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(PLAIN_LOG_DDL)
        conn.executemany(
            "INSERT INTO cost_events (ts, provider, model, feature, user_id, prompt_tokens, completion_tokens, "
            "cost_usd, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                ("2026-12-01 10:00:00", "anthropic", "claude-sonnet-4-6", "chat", "u-1", 100, 20, 0.5, 300.0),
                ("2026-12-01T11:30:00+00:00", "anthropic", "claude-sonnet-4-6", "chat", "u-2", 50, 10, 0.25, 200.0),
                ("2026-12-01T12:00:00.250+02:00", "anthropic", "mystery-model", "chat", "u-2", 5, 1, None, 90.0),
            ],
        )

    store = Store(f"sqlite:///{path}")
    rows = store.fetch_events()

    assert store.schema_version() == SCHEMA_VERSION
    assert len(rows) == 3
    assert [row["ts"] for row in rows] == [
        datetime(2026, 12, 1, 10, 0),
        datetime(2026, 12, 1, 11, 30),
        datetime(2026, 12, 1, 10, 0, 0, 250_000),
    ]
    assert [row["event_id"] for row in rows] == ["legacy-1", "legacy-2", "legacy-3"]
    assert [row["unpriced"] for row in rows] == [False, False, True]
    assert [row["status"] for row in rows] == ["ok", "ok", "ok"]
    assert [row["cost_usd"] for row in rows] == [0.5, 0.25, None]


def test_plain_log_accepts_new_rows(tmp_path):
    path = tmp_path / "plain.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(PLAIN_LOG_DDL)
        conn.execute(
            "INSERT INTO cost_events (ts, provider, model, feature, user_id, prompt_tokens, completion_tokens, "
            "cost_usd, latency_ms) VALUES ('2026-12-01 10:00:00', 'anthropic', 'm', 'f', 'u', 1, 1, 0.1, 1)"
        )
    store = Store(f"sqlite:///{path}")
    event = CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=Usage(input_tokens=10), response_id="msg_a")

    inserted = store.insert_events([event.to_row(), event.to_row()])

    assert inserted == 1
    assert store.count_events() == 2


def test_version_1_upgrades_in_place(tmp_path):
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(VERSION_1_DDL)
    old = Store(f"sqlite:///{path}")
    # Write rows the way version 1 did, before this Store upgrades anything.
    rows = [
        CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=Usage(input_tokens=n), response_id=f"msg_{n}")
        .to_row()
        for n in range(1, 6)
    ]
    with sqlite3.connect(path) as conn:
        columns = list(rows[0])
        conn.executemany(
            f"INSERT INTO cost_events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [tuple(_plain(row[name]) for name in columns) for row in rows],
        )
    assert _schema_version(path) == "1"

    count = old.count_events()

    assert count == 5
    assert _schema_version(path) == str(SCHEMA_VERSION)
    with sqlite3.connect(path) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "cost_daily" in tables
    assert old.insert_events(rows) == 0
    assert [row["id"] for row in old.fetch_events()] == [1, 2, 3, 4, 5]
    with sqlite3.connect(path) as conn:
        ddl = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'cost_events'").fetchone()[0]
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "AUTOINCREMENT" in ddl
    assert {"ix_cost_events_cost_ts", "uq_cost_events_response_id", "uq_cost_events_event_id"} <= indexes
    assert "ix_cost_events_ts" not in indexes
    assert "ix_cost_events_feature_ts" not in indexes
    assert "ix_cost_events_user_ts" not in indexes


def test_upgrade_is_idempotent(tmp_path):
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(VERSION_1_DDL)

    for _ in range(3):
        store = Store(f"sqlite:///{path}")
        store.ensure_schema()
        store.dispose()

    assert _schema_version(path) == str(SCHEMA_VERSION)


def test_newer_schema_is_rejected(tmp_path):
    path = tmp_path / "future.db"
    Store(f"sqlite:///{path}").ensure_schema()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE llmcost_meta SET value = '999' WHERE key = 'schema_version'")

    with pytest.raises(Exception, match="schema version 999"):
        Store(f"sqlite:///{path}").ensure_schema()


def _plain(value):
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, bool):
        return int(value)
    return value


def test_version_3_fills_feature_rollups(tmp_path):
    from datetime import timedelta

    from llmcost_mw.retention import refresh_rollups

    path = tmp_path / "v3.db"
    store = Store(f"sqlite:///{path}")
    now = datetime(2026, 12, 4, 12)
    rows = [
        CostEvent(
            provider="anthropic",
            model="claude-sonnet-4-6",
            usage=Usage(input_tokens=10),
            feature=f"f{n % 3}",
            user_id=f"u{n % 5}",
            ts=now - timedelta(days=1 + n % 4),
        ).to_row()
        for n in range(60)
    ]
    store.insert_events(rows)
    refresh_rollups(store, clock=lambda: now)
    store.dispose()
    # Back to what version 3 had: no per-feature roll-up, the two extra indexes.
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE cost_daily_feature")
        conn.execute("CREATE INDEX ix_cost_events_ts ON cost_events (ts)")
        conn.execute("UPDATE llmcost_meta SET value = '3' WHERE key = 'schema_version'")

    upgraded = Store(f"sqlite:///{path}")
    upgraded.ensure_schema()

    with sqlite3.connect(path) as conn:
        per_feature = conn.execute(
            "SELECT day, feature, SUM(calls) FROM cost_daily_feature GROUP BY day, feature ORDER BY 1, 2"
        ).fetchall()
        per_user = conn.execute(
            "SELECT day, feature, SUM(calls) FROM cost_daily GROUP BY day, feature ORDER BY 1, 2"
        ).fetchall()
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert per_feature == per_user
    assert sum(calls for _, _, calls in per_feature) == 60
    assert "ix_cost_events_ts" not in indexes
    assert _schema_version(path) == str(SCHEMA_VERSION)


def test_version_4_drops_user_index(tmp_path):
    path = tmp_path / "v4.db"
    store = Store(f"sqlite:///{path}")
    events = [
        CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=Usage(), user_id=f"u{n}") for n in range(7)
    ]
    store.insert_events([item.to_row() for item in events])
    store.dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE INDEX ix_cost_events_user_ts ON cost_events (user_id, ts)")
        conn.execute("UPDATE llmcost_meta SET value = '4' WHERE key = 'schema_version'")

    upgraded = Store(f"sqlite:///{path}")
    count = upgraded.count_events()
    upgraded.dispose()

    with sqlite3.connect(path) as conn:
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert count == 7
    assert "ix_cost_events_user_ts" not in indexes
    assert "ix_cost_events_cost_ts" in indexes
    assert _schema_version(path) == "5"
