"""The SQLite store and the recorder that writes to it, checked with the stdlib sqlite3 module."""

from __future__ import annotations

import atexit
import json
import re
import sqlite3
import time
from datetime import datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from pathlib import Path

import pytest

from llmcost_mw.errors import ConfigurationError
from llmcost_mw.events import CostEvent, Status, utcnow
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import SCHEMA_VERSION, Store
from llmcost_mw.usage import Usage

# The report queries that users run by hand in the sqlite3 shell, verbatim.
COST_PER_FEATURE_7_DAYS = """
SELECT
  feature,
  COUNT(*)                                                           AS calls,
  ROUND(SUM(cost_usd), 2)                                            AS total_usd,
  ROUND(AVG(cost_usd), 4)                                            AS avg_call_usd,
  ROUND(SUM(prompt_tokens + completion_tokens) * 1.0 / COUNT(*), 0)  AS avg_tokens
FROM cost_events
WHERE ts >= datetime('now', '-7 days')
GROUP BY feature
ORDER BY total_usd DESC;
"""

TOP_USERS_7_DAYS = """
SELECT user_id, COUNT(*) AS calls, ROUND(SUM(cost_usd), 2) AS total_usd
FROM cost_events
WHERE ts >= datetime('now', '-7 days')
GROUP BY user_id ORDER BY total_usd DESC LIMIT 20;
"""

DAILY_COST_PER_FEATURE_30_DAYS = """
SELECT date(ts) AS day, feature, ROUND(SUM(cost_usd), 2) AS daily_usd
FROM cost_events
WHERE ts >= datetime('now', '-30 days')
GROUP BY date(ts), feature
ORDER BY day DESC, daily_usd DESC;
"""


def event(*, cost=None, ts=None, user_id="u1", feature="f", response_id=None, **usage) -> CostEvent:
    return CostEvent(
        provider="anthropic",
        model="claude-sonnet-4-5-20250929",
        usage=Usage(**usage),
        ts=ts if ts is not None else utcnow(),
        user_id=user_id,
        feature=feature,
        response_id=response_id,
        cost_usd=Decimal(cost) if cost is not None else None,
        unpriced=cost is None,
    )


def noon(days_ago: int) -> datetime:
    day = utcnow().date() - timedelta(days=days_ago)
    return datetime.combine(day, clock_time(12, 0))


def write(store, events) -> None:
    """Record events through a Recorder and wait until they are written."""
    spill_path = Path(store.engine.url.database).with_name("spill.jsonl")
    recorder = Recorder(store, spill_path=spill_path)
    for item in events:
        recorder.record(item)
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)


def spilled_event_ids(spill_path: Path) -> list[str]:
    """Read the event ids of a spill file: each line is [layout, *values] with `event_id` first."""
    lines = [json.loads(line) for line in spill_path.read_text("utf-8").splitlines()]
    assert all(line[0] == 1 for line in lines)
    return [line[1] for line in lines]


@pytest.fixture
def sql(db_path):
    connection = sqlite3.connect(db_path)
    yield connection
    connection.close()


def test_recorder_writes_given_rows(store):
    events = [
        event(cost="0.5", user_id="alice", feature="summarize", input_tokens=10, output_tokens=5),
        event(cost="1.25", user_id="bob", feature="chat", input_tokens=20, output_tokens=7),
        event(cost=None, user_id=None, feature=None, input_tokens=1),
    ]

    write(store, events)
    rows = store.fetch_events()

    assert [row["event_id"] for row in rows] == [item.event_id for item in events]
    assert [row["user_id"] for row in rows] == ["alice", "bob", None]
    assert [row["feature"] for row in rows] == ["summarize", "chat", None]
    assert [row["cost_usd"] for row in rows] == [0.5, 1.25, None]
    assert [row["unpriced"] for row in rows] == [False, False, True]
    assert [row["ts"] for row in rows] == [item.ts for item in events]


def test_prompt_tokens_sum_of_input_buckets(store):
    item = event(
        cost="1",
        input_tokens=3,
        cache_write_5m_tokens=12304,
        cache_write_1h_tokens=7,
        cache_read_tokens=250,
        output_tokens=550,
    )

    write(store, [item])
    row = store.fetch_events()[0]

    assert row["prompt_tokens"] == 3 + 12304 + 7 + 250
    assert row["completion_tokens"] == 550
    assert row["input_tokens"] == 3
    assert row["cache_write_5m_tokens"] == 12304
    assert row["cache_write_1h_tokens"] == 7
    assert row["cache_read_tokens"] == 250


@pytest.fixture
def report_db(store, db_path):
    """Write rows across 31 days; only the row 31 days old is outside every report."""
    events = [
        event(
            cost="1.25",
            ts=utcnow() - timedelta(minutes=1),
            user_id="alice",
            feature="summarize",
            input_tokens=100,
            cache_write_5m_tokens=10,
            cache_read_tokens=50,
            output_tokens=40,
        ),
        event(cost=None, ts=noon(1), user_id="dave", feature="chat", input_tokens=5, output_tokens=5),
        event(
            cost="0.75", ts=noon(2), user_id="bob", feature="summarize", input_tokens=300, output_tokens=100
        ),
        event(cost="3.10", ts=noon(3), user_id="alice", feature="chat", input_tokens=1000),
        event(cost="0.40", ts=noon(6), user_id="carol", feature="chat", input_tokens=10, output_tokens=10),
        event(cost="100", ts=noon(8), user_id="alice", feature="summarize", input_tokens=1),
        event(cost="50", ts=noon(31), user_id="bob", feature="chat", input_tokens=1),
    ]
    write(store, events)
    return events


def test_report_cost_per_feature(report_db, sql):
    rows = sql.execute(COST_PER_FEATURE_7_DAYS).fetchall()

    # chat has 3.10 + 0.40 and one unpriced call, with (1000 + 20 + 10) / 3 tokens a call.
    # summarize has 1.25 + 0.75, with (200 + 400) / 2 tokens a call.
    assert rows == [
        ("chat", 3, 3.5, 1.75, 343.0),
        ("summarize", 2, 2.0, 1.0, 300.0),
    ]


def test_report_top_users(report_db, sql):
    rows = sql.execute(TOP_USERS_7_DAYS).fetchall()

    assert rows == [
        ("alice", 2, 4.35),
        ("bob", 1, 0.75),
        ("carol", 1, 0.4),
        ("dave", 1, None),
    ]


def test_report_daily_cost_per_feature(report_db, sql):
    rows = sql.execute(DAILY_COST_PER_FEATURE_30_DAYS).fetchall()

    inside = report_db[:-1]
    expected = [
        (
            item.ts.date().isoformat(),
            item.feature,
            float(item.cost_usd) if item.cost_usd is not None else None,
        )
        for item in inside
    ]
    assert rows == expected


def test_last_hour_filter(store, sql):
    now_row = event(cost="1", ts=utcnow())
    recent_row = event(cost="1", ts=utcnow() - timedelta(minutes=59))
    old_row = event(cost="1", ts=utcnow() - timedelta(minutes=61))

    write(store, [now_row, recent_row, old_row])
    selected = {
        row[0]
        for row in sql.execute("SELECT event_id FROM cost_events WHERE ts >= datetime('now', '-1 hour')")
    }

    assert now_row.event_id in selected
    assert recent_row.event_id in selected
    assert old_row.event_id not in selected


def test_ts_stored_as_utc_text(store, sql):
    item = event(cost="1", ts=datetime(2026, 3, 4, 5, 6, 7, 890000))

    write(store, [item])
    kind, text = sql.execute("SELECT typeof(ts), ts FROM cost_events").fetchone()

    assert kind == "text"
    assert re.fullmatch(r"2026-03-04 05:06:07(\.\d+)?", text)


def test_wal_journal_mode(store, sql):
    store.ensure_schema()

    assert sql.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_duplicate_event_id_skipped(store):
    item = event(cost="1")

    store.ensure_schema()
    first = store.insert_events([item.to_row()])
    second = store.insert_events([item.to_row()])

    assert first == 1
    assert second == 0
    assert store.count_events() == 1


def test_duplicate_event_id_through_recorder(store):
    item = event(cost="1")

    write(store, [item, item])

    assert store.count_events() == 1


def test_duplicate_response_id_skipped(store):
    write(store, [event(cost="1", response_id="msg_1"), event(cost="1", response_id="msg_1")])

    assert store.count_events() == 1


def test_null_response_ids_kept(store):
    write(store, [event(cost=None, response_id=None), event(cost=None, response_id=None)])

    assert store.count_events() == 2


def test_schema_version_recorded(store, sql):
    store.ensure_schema()
    stored = sql.execute("SELECT value FROM llmcost_meta WHERE key = 'schema_version'").fetchone()

    assert stored == (str(SCHEMA_VERSION),)
    assert store.schema_version() == SCHEMA_VERSION


def test_newer_schema_rejected(store, db_path, sql):
    store.ensure_schema()
    with sql:
        sql.execute(
            "UPDATE llmcost_meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )

    newer = Store(f"sqlite:///{db_path}")
    try:
        with pytest.raises(ConfigurationError, match="upgrade"):
            newer.ensure_schema()
    finally:
        newer.dispose()


def test_missing_directory_rejected(tmp_path):
    with pytest.raises(ConfigurationError, match="does not exist"):
        Store(f"sqlite:///{tmp_path}/absent/costs.db")


def test_sync_durability_writes_at_once(store, tmp_path):
    recorder = Recorder(store, durability="sync", spill_path=tmp_path / "spill.jsonl")

    recorder.record(event(cost="1"))

    assert store.count_events() == 1
    recorder.close(timeout_seconds=2)


def lock_database(db_path) -> sqlite3.Connection:
    """Return a connection that holds the write lock until it commits."""
    locker = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


@pytest.fixture
def locked_store(db_path):
    # A short busy timeout, so that writes fail fast while the lock is held.
    store = Store(f"sqlite:///{db_path}", busy_timeout_ms=50)
    store.ensure_schema()
    yield store
    store.dispose()


def test_spill_when_queue_full(locked_store, db_path, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, max_queue_events=2, flush_interval_seconds=0.3, spill_path=spill_path)
    events = [event(cost="1", user_id=f"user-{i}") for i in range(5)]

    try:
        for item in events:
            recorder.record(item)
        spilled = spilled_event_ids(spill_path)
        spilled_count = recorder.spilled
        flushed_while_locked = recorder.flush(timeout_seconds=0.5)
        rows_while_locked = locker.execute("SELECT count(*) FROM cost_events").fetchone()[0]
    finally:
        locker.execute("COMMIT")
        locker.close()
    flushed = recorder.flush(timeout_seconds=10)
    rows = locked_store.fetch_events()
    recorder.close(timeout_seconds=2)

    assert spilled == [item.event_id for item in events[2:]]
    assert spilled_count == 3
    assert flushed_while_locked is False
    assert rows_while_locked == 0
    assert flushed is True
    assert sorted(row["event_id"] for row in rows) == sorted(item.event_id for item in events)
    assert not spill_path.exists()
    assert not spill_path.with_name(spill_path.name + ".replaying").exists()


def test_spilled_rows_keep_values(locked_store, db_path, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, max_queue_events=1, flush_interval_seconds=0.3, spill_path=spill_path)
    first = event(cost="0.25", user_id="queued")
    second = event(
        cost="0.054399",
        user_id="spilled",
        input_tokens=3,
        cache_write_5m_tokens=12304,
        output_tokens=550,
        response_id="msg_spill",
    )

    try:
        recorder.record(first)
        recorder.record(second)
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    by_user = {row["user_id"]: row for row in locked_store.fetch_events()}

    assert by_user["spilled"]["ts"] == second.ts
    assert by_user["spilled"]["cost_usd"] == 0.054399
    assert by_user["spilled"]["prompt_tokens"] == 12307
    assert by_user["spilled"]["response_id"] == "msg_spill"
    assert by_user["queued"]["cost_usd"] == 0.25


def test_close_writes_queue(store, tmp_path):
    # A long flush interval: only close() can have written these rows.
    recorder = Recorder(store, flush_interval_seconds=30, spill_path=tmp_path / "spill.jsonl")
    events = [event(cost="1", user_id=f"user-{i}") for i in range(10)]

    for item in events:
        recorder.record(item)
    recorder.close(timeout_seconds=10)

    assert store.count_events() == 10
    assert recorder.queued == 0


def test_close_while_locked_spills_then_replays(locked_store, db_path, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, flush_interval_seconds=0.05, spill_path=spill_path)
    events = [event(cost="1", user_id=f"user-{i}") for i in range(3)]

    try:
        for item in events:
            recorder.record(item)
        recorder.close(timeout_seconds=0.5)
        spilled = spilled_event_ids(spill_path)
    finally:
        locker.execute("COMMIT")
        locker.close()
    # A second close() of this stopped recorder, as atexit makes, waits its
    # whole timeout. test_second_close_returns_quickly covers that.
    atexit.unregister(recorder._close_at_exit)
    next_start = Recorder(locked_store, spill_path=spill_path)
    flushed = next_start.flush(timeout_seconds=10)
    next_start.close(timeout_seconds=2)

    assert sorted(spilled) == sorted(item.event_id for item in events)
    assert flushed is True
    assert locked_store.count_events() == 3
    assert not spill_path.exists()


def test_second_close_returns_quickly(locked_store, db_path, tmp_path):
    # atexit calls close() again after the application's own close().
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, flush_interval_seconds=0.05, spill_path=tmp_path / "spill.jsonl")

    try:
        recorder.record(event(cost="1"))
        recorder.close(timeout_seconds=0.5)
    finally:
        locker.execute("COMMIT")
        locker.close()
    started = time.monotonic()
    try:
        recorder.close(timeout_seconds=3)
        elapsed_seconds = time.monotonic() - started
    finally:
        atexit.unregister(recorder._close_at_exit)

    assert elapsed_seconds < 1.5


def test_record_never_raises_on_failing_store(locked_store, db_path, tmp_path):
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, durability="sync", spill_path=tmp_path / "spill.jsonl")

    try:
        recorder.record(event(cost="1"))
        queued_while_locked = recorder.queued
    finally:
        locker.execute("COMMIT")
        locker.close()
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)

    assert queued_while_locked == 1
    assert locked_store.count_events() == 1


def test_record_never_raises_when_spill_fails(locked_store, db_path, tmp_path):
    # The spill directory cannot be created because a regular file has its name.
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    locker = lock_database(db_path)
    recorder = Recorder(
        locked_store, max_queue_events=1, flush_interval_seconds=0.3, spill_path=blocker / "spill.jsonl"
    )

    try:
        recorder.record(event(cost="1"))
        recorder.record(event(cost="2"))
    finally:
        locker.execute("COMMIT")
        locker.close()
    flushed = recorder.flush(timeout_seconds=5)
    recorder.close(timeout_seconds=2)

    assert flushed is True
    assert locked_store.count_events() == 2


def test_status_values_stored(store):
    items = [event(cost="1"), event(cost=None)]
    items[1].status = Status.ERROR
    items[1].error_type = "InternalServerError"

    write(store, items)
    rows = store.fetch_events()

    assert [row["status"] for row in rows] == ["ok", "error"]
    assert rows[1]["error_type"] == "InternalServerError"


# -- the spill file's format ------------------------------------------------------

# The columns of spill layout 1, as files written by this version hold them.
# Changing the inserted columns needs a new layout, and the old one kept, so
# that spill files written before an upgrade are still read.
SPILL_LAYOUT_1 = (
    "event_id", "ts", "provider", "model", "request_model", "feature", "user_id", "request_id",
    "response_id", "status", "error_type", "prompt_tokens", "completion_tokens", "input_tokens",
    "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens", "output_tokens",
    "reasoning_tokens", "web_search_requests", "web_fetch_requests", "cost_usd", "unpriced",
    "price_version", "price_id", "service_tier", "latency_ms", "context_missing", "flags",
)  # fmt: skip


def test_spill_layout_matches_inserted_columns():
    from llmcost_mw.store import INSERT_COLUMNS

    assert INSERT_COLUMNS == SPILL_LAYOUT_1, "the inserted columns changed: add a spill layout in recorder.py"


def replay(store, spill_path: Path) -> Recorder:
    recorder = Recorder(store, spill_path=spill_path, flush_interval_seconds=0.05)
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    return recorder


def test_spill_file_of_earlier_version_replayed(store, tmp_path):
    # Earlier versions wrote one JSON object per row.
    spill_path = tmp_path / "spill.jsonl"
    items = [
        event(cost="0.054399", user_id=f"u-{i}", input_tokens=12307, output_tokens=550) for i in range(3)
    ]
    lines = []
    for item in items:
        row = item.to_row()
        row["ts"] = row["ts"].isoformat(sep=" ")
        lines.append(json.dumps(row) + "\n")
    spill_path.write_text("".join(lines), encoding="utf-8")

    replay(store, spill_path)
    rows = store.fetch_events()

    assert [row["event_id"] for row in rows] == [item.event_id for item in items]
    assert [row["ts"] for row in rows] == [item.ts for item in items]
    assert {row["cost_usd"] for row in rows} == {0.054399}
    assert {row["prompt_tokens"] for row in rows} == {12307}
    assert not spill_path.exists()


def test_unreadable_spill_lines_saved_as_rejected(store, tmp_path, caplog):
    spill_path = tmp_path / "spill.jsonl"
    good = [event(cost="1", user_id=f"u-{i}") for i in range(2)]
    values = [json.dumps([1, *item.values(ts_as_text=True)]) for item in good]
    unknown_layout = json.dumps([99, "x"])
    torn = values[1][:40]
    spill_path.write_text(f"{values[0]}\n{unknown_layout}\n{values[1]}\n{torn}", encoding="utf-8")

    with caplog.at_level("ERROR", logger="llmcost_mw.recorder"):
        replay(store, spill_path)
    rejected = [json.loads(line) for line in Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()]

    assert sorted(row["event_id"] for row in store.fetch_events()) == sorted(item.event_id for item in good)
    assert [record["line"] for record in rejected] == [unknown_layout, torn]
    assert all(record["error"].startswith("unreadable spill line") for record in rejected)
    assert "line 2 of" in caplog.text
    assert not spill_path.exists()


class SizeProbeStore(Store):
    """A real SQLite store that notes how many rows each transaction inserts."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.sizes: list[int] = []

    def insert_values(self, values):
        self.sizes.append(len(values))
        return super().insert_values(values)


def test_long_spill_file_replayed_in_transactions(db_path, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    items = [event(cost="0.01", user_id=f"u-{i % 7}") for i in range(2_300)]
    spill_path.write_text(
        "".join(json.dumps([1, *item.values(ts_as_text=True)]) + "\n" for item in items), encoding="utf-8"
    )
    store = SizeProbeStore(f"sqlite:///{db_path}")

    recorder = Recorder(store, spill_path=spill_path, batch_size=100, flush_interval_seconds=0.05)
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    count = store.count_events()
    store.dispose()

    # Five batches of 100 per transaction while a backlog waits.
    assert store.sizes == [500, 500, 500, 500, 300]
    assert count == 2_300


def spill_line(item) -> str:
    return json.dumps([1, *item.values(ts_as_text=True)])


def test_non_utf8_spill_line_saved_as_rejected(store, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    good = [event(cost="1", user_id=f"u-{i}") for i in range(4)]
    lines = [spill_line(item).encode() for item in good]
    spill_path.write_bytes(b"\n".join([lines[0], lines[1], b'[1, "\xff\xfe"]', lines[2], lines[3]]) + b"\n")

    replay(store, spill_path)
    rejected = [json.loads(line) for line in Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()]

    assert sorted(row["event_id"] for row in store.fetch_events()) == sorted(item.event_id for item in good)
    assert len(rejected) == 1
    assert rejected[0]["error"].startswith("unreadable spill line")
    assert not spill_path.exists()


def test_spill_layout_must_be_an_integer(store, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    item = event(cost="1")
    values = item.values(ts_as_text=True)
    lines = [json.dumps([True, *values]), json.dumps([1.0, *values])]
    spill_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    replay(store, spill_path)
    rejected = Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()

    assert store.count_events() == 0
    assert len(rejected) == 2


def test_lone_rejected_row_at_end_of_replay(db_path, tmp_path):
    # The last transaction of the replay has only a row that the store
    # rejects. The store works, so the row is set aside and the file is done.
    spill_path = tmp_path / "spill.jsonl"
    items = [event(cost="0.01", user_id=f"u-{i}") for i in range(501)]
    items[-1].model = None
    spill_path.write_text("".join(spill_line(item) + "\n" for item in items), encoding="utf-8")
    store = Store(f"sqlite:///{db_path}")

    recorder = Recorder(store, spill_path=spill_path, batch_size=100, flush_interval_seconds=0.05)
    flushed = recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    count = store.count_events()
    store.dispose()
    rejected = [json.loads(line) for line in Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()]

    assert flushed is True
    assert count == 500
    assert [record["row"]["event_id"] for record in rejected] == [items[-1].event_id]
    assert not spill_path.exists()
    assert not Path(f"{spill_path}.replaying").exists()


def test_append_after_torn_line_starts_new_line(locked_store, db_path, tmp_path):
    # A process died mid-append: the file ends without a newline.
    spill_path = tmp_path / "spill.jsonl"
    spill_path.write_text(spill_line(event(cost="1"))[:40], encoding="utf-8")
    locker = lock_database(db_path)
    recorder = Recorder(locked_store, max_queue_events=1, flush_interval_seconds=0.3, spill_path=spill_path)
    items = [event(cost="1", user_id=f"u-{i}") for i in range(4)]

    try:
        for item in items:
            recorder.record(item)
    finally:
        locker.execute("COMMIT")
        locker.close()
    flushed = recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    stored = sorted(row["event_id"] for row in locked_store.fetch_events())
    rejected = Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()

    assert flushed is True
    assert stored == sorted(item.event_id for item in items)
    assert len(rejected) == 1


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("prompt_tokens", "abc", id="text-in-integer"),
        pytest.param("input_tokens", 1.5, id="fraction-in-integer"),
        pytest.param("cost_usd", "cheap", id="text-in-float"),
        pytest.param("unpriced", 1, id="number-in-boolean"),
        pytest.param("model", 7, id="number-in-text"),
    ],
)
def test_spill_line_with_wrong_type_rejected(store, tmp_path, column, value):
    from llmcost_mw.store import INSERT_COLUMNS

    spill_path = tmp_path / "spill.jsonl"
    good = event(cost="1")
    damaged = list(event(cost="1").values(ts_as_text=True))
    damaged[INSERT_COLUMNS.index(column)] = value
    spill_path.write_text(spill_line(good) + "\n" + json.dumps([1, *damaged]) + "\n", encoding="utf-8")

    replay(store, spill_path)
    rejected = Path(f"{spill_path}.rejected").read_text("utf-8").splitlines()

    assert [row["event_id"] for row in store.fetch_events()] == [good.event_id]
    assert len(rejected) == 1
    assert column in json.loads(rejected[0])["error"]
