"""The write path under failure: the caller's calls go on, events wait, and none is lost.

The outages are real: another process holding the SQLite write lock, a full
filesystem under the database, a PostgreSQL server that is stopped and
started again, and processes that end by SIGTERM, exit or SIGKILL.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx2
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from llmcost_mw import attribute, instrument, uninstrument
from llmcost_mw.context import current_attribution
from llmcost_mw.events import CostEvent
from llmcost_mw.metrics import Metrics
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

MODEL = "claude-sonnet-4-5-20250929"
QUEUED_GAUGE = "llmcost_recorder_queued_events"
REQUEST = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
# A call that waited on the store would take the store's whole outage.
MAX_CALL_SECONDS = 0.5
_message_ids = itertools.count()


def message_reply(request: httpx2.Request) -> httpx2.Response:
    body = {
        "id": f"msg_dur_{os.getpid()}_{next(_message_ids)}",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 7},
    }
    return httpx2.Response(200, json=body)


@contextlib.contextmanager
def instrumented(api, store: Store, spill_path: Path, **options):
    """Yield an SDK client recorded into `store`, its recorder and its metrics registry."""
    registry = CollectorRegistry()
    options.setdefault("flush_interval_seconds", 0.05)
    recorder = Recorder(store, spill_path=spill_path, **options)
    instrument(store=store, recorder=recorder, metrics=Metrics(registry))
    client = api.client(message_reply)
    try:
        yield client, recorder, registry
    finally:
        uninstrument()
        recorder.close(timeout_seconds=5)


def call_many(client, count: int, *, pause_seconds: float = 0.0) -> list[float]:
    """Make `count` calls and return the duration of each in seconds."""
    durations = []
    for _ in range(count):
        started = time.perf_counter()
        message = client.messages.create(**REQUEST)
        durations.append(time.perf_counter() - started)
        assert message.content[0].text == "ok"
        time.sleep(pause_seconds)
    return durations


def queued_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(QUEUED_GAUGE)


def recorder_log_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "llmcost_mw.recorder"]


def failed_attempts_reported(caplog) -> int:
    """Return the failure count of the recorder's "available again" message, or 0 when there was none."""
    for record in recorder_log_lines(caplog):
        if "available again" in record.getMessage():
            return int(record.args[1])
    return 0


def wait_until(condition, timeout_seconds: float, message: str) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.02)


# -- the writer's context -------------------------------------------------------


class ContextProbeStore(Store):
    """A real SQLite store that notes the attribution visible to the thread that writes."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.seen_in_writer: list[object] = []

    def insert_values(self, values):
        self.seen_in_writer.append(current_attribution())
        return super().insert_values(values)


def test_writer_context_has_no_attribution(db_path, tmp_path):
    store = ContextProbeStore(f"sqlite:///{db_path}")
    recorder = Recorder(store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05)
    try:
        with attribute(user_id="alice", feature="chat"):
            # The first event starts the writer, from inside alice's scope.
            recorder.record(CostEvent(provider="anthropic", model=MODEL, usage=Usage(), user_id="alice"))
            assert recorder._thread is not None
            assert recorder.flush(timeout_seconds=10)
            in_scope = current_attribution()
        recorder.record(CostEvent(provider="anthropic", model=MODEL, usage=Usage()))
        assert recorder.flush(timeout_seconds=10)
    finally:
        recorder.close(timeout_seconds=2)
    rows = store.fetch_events()
    store.dispose()

    assert in_scope is not None and in_scope.user_id == "alice"
    assert store.seen_in_writer
    assert all(seen is None for seen in store.seen_in_writer)
    assert [row["user_id"] for row in rows] == ["alice", None]


def test_attribution_copied_when_call_made(api, store, tmp_path):
    spill_path = tmp_path / "spill.jsonl"
    with instrumented(api, store, spill_path, flush_interval_seconds=30) as (client, recorder, _):
        with attribute(user_id="alice", feature="chat") as scope:
            client.messages.create(**REQUEST)
            # Changed after the call, before the writer ran: the row keeps alice.
            scope.user_id = "mallory"
        assert recorder.flush(timeout_seconds=10)
    rows = store.fetch_events()

    assert [(row["user_id"], row["feature"]) for row in rows] == [("alice", "chat")]


# -- SQLite write lock held by another process -----------------------------------

LOCK_HOLDER = textwrap.dedent(
    """
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("COMMIT")
    """
)


@contextlib.contextmanager
def write_lock_held(db_path: Path, seconds: float):
    """Hold the SQLite write lock of `db_path` in another process for `seconds`; yield that process."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(db_path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.wait(timeout=seconds + 30)


def test_write_lock_held_10s_calls_continue(api, store, db_path, tmp_path, caplog):
    store.ensure_schema()
    calls = 40
    with instrumented(api, store, tmp_path / "spill.jsonl") as (client, recorder, registry):
        with write_lock_held(db_path, 10.0) as holder:
            started = time.monotonic()
            durations = call_many(client, calls, pause_seconds=0.02)
            # The writer waits inside SQLite's busy timeout (30 s), so its
            # write neither fails nor returns until the lock is released.
            time.sleep(0.3)
            gauge_while_locked = queued_gauge(registry)
            written_while_locked = recorder.written
            still_locked = holder.poll() is None and time.monotonic() - started < 9.0
        assert recorder.flush(timeout_seconds=30)
        gauge_after = queued_gauge(registry)
    rows = store.fetch_events()

    assert still_locked
    assert max(durations) < MAX_CALL_SECONDS
    assert written_while_locked == 0
    assert gauge_while_locked == calls
    assert gauge_after == 0
    assert len(rows) == calls
    assert len({row["event_id"] for row in rows}) == calls
    assert not [record for record in recorder_log_lines(caplog) if record.levelno >= logging.ERROR]


def test_write_lock_short_busy_timeout_logs_rarely(api, db_path, tmp_path, caplog):
    # A busy timeout of 100 ms turns the held lock into failed writes, retried with backoff.
    store = Store(f"sqlite:///{db_path}", busy_timeout_ms=100)
    store.ensure_schema()
    calls = 30
    caplog.set_level(logging.INFO, logger="llmcost_mw.recorder")
    try:
        with instrumented(api, store, tmp_path / "spill.jsonl") as (client, recorder, registry):
            with write_lock_held(db_path, 4.0):
                durations = call_many(client, calls, pause_seconds=0.05)
                gauge_while_locked = queued_gauge(registry)
                errors_while_locked = [
                    record for record in recorder_log_lines(caplog) if record.levelno >= logging.ERROR
                ]
            assert recorder.flush(timeout_seconds=30)
        rows = store.fetch_events()
    finally:
        store.dispose()

    assert max(durations) < MAX_CALL_SECONDS
    assert gauge_while_locked == calls
    assert failed_attempts_reported(caplog) >= 4
    assert len(errors_while_locked) == 1
    assert len(rows) == calls


# -- full filesystem -------------------------------------------------------------


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs mounted for this test; skipped where mounting is not permitted, except in CI."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        message = f"cannot mount a tmpfs (root is needed): {result.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill_filesystem(directory: Path) -> Path:
    """Write a file that takes every free byte of the filesystem of `directory`; return its path."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with open(filler, "wb", buffering=0) as output:
        while True:
            try:
                output.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def test_full_disk_events_wait_in_memory(api, small_filesystem, caplog):
    db_path = small_filesystem / "costs.db"
    store = Store(f"sqlite:///{db_path}")
    store.ensure_schema()
    with store.engine.connect() as conn:
        # An empty WAL: every new row needs new space on the full filesystem.
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    filler = fill_filesystem(small_filesystem)
    calls = 60
    try:
        # The spill file sits next to the database, on the full filesystem
        # too, so past the bound the events stay in memory.
        with instrumented(api, store, small_filesystem / "spill.jsonl", max_queue_events=20) as (
            client,
            recorder,
            registry,
        ):
            durations = call_many(client, calls, pause_seconds=0.03)
            wait_until(lambda: failed_attempts_now(recorder) >= 3, 10, "the writer did not retry 3 times")
            gauge_while_full = queued_gauge(registry)
            written_while_full = recorder.written
            errors_while_full = [
                record for record in recorder_log_lines(caplog) if record.levelno >= logging.ERROR
            ]
            filler.unlink()
            assert recorder.flush(timeout_seconds=30)
        rows = store.fetch_events()
    finally:
        store.dispose()

    assert max(durations) < MAX_CALL_SECONDS
    assert written_while_full == 0
    assert gauge_while_full == calls
    assert any("disk is full" in record.getMessage() for record in errors_while_full)
    # One line for the store, one for the spill file: rate-limited, not one per failure.
    assert len(errors_while_full) <= 2
    assert len(rows) == calls
    assert len({row["event_id"] for row in rows}) == calls


def failed_attempts_now(recorder: Recorder) -> int:
    return recorder._failed_attempts


# -- PostgreSQL stopped and started ---------------------------------------------


@pytest.fixture(scope="module")
def own_postgres():
    """A PostgreSQL server for this module alone, since its tests stop it."""
    from postgres_server import running_postgres

    with running_postgres() as server:
        yield server


def test_postgres_restart_spills_then_writes_all(api, own_postgres, tmp_path, caplog):
    store = Store(own_postgres.create_database())
    store.ensure_schema()
    spill_path = tmp_path / "spill.jsonl"
    calls = 60
    bound = 20
    try:
        with instrumented(api, store, spill_path, max_queue_events=bound) as (client, recorder, registry):
            call_many(client, 5)
            assert recorder.flush(timeout_seconds=10)
            own_postgres.stop()
            try:
                durations = call_many(client, calls, pause_seconds=0.02)
                wait_until(lambda: failed_attempts_now(recorder) >= 3, 15, "the writer did not retry 3 times")
                gauge_while_down = queued_gauge(registry)
                spilled_lines = len(spill_path.read_text("utf-8").splitlines())
                errors_while_down = [
                    record for record in recorder_log_lines(caplog) if record.levelno >= logging.ERROR
                ]
            finally:
                own_postgres.start()
            assert recorder.flush(timeout_seconds=30)
            gauge_after = queued_gauge(registry)
        rows = store.fetch_events()
    finally:
        store.dispose()

    assert max(durations) < MAX_CALL_SECONDS
    assert gauge_while_down == calls
    assert spilled_lines == calls - bound
    assert len(errors_while_down) == 1
    assert failed_attempts_reported(caplog) >= 3
    assert gauge_after == 0
    assert len(rows) == calls + 5
    assert len({row["event_id"] for row in rows}) == calls + 5
    assert not spill_path.exists()


# -- the spill file --------------------------------------------------------------


def stored_event_ids(store: Store) -> list[str]:
    return [row["event_id"] for row in store.fetch_events()]


def test_spill_replayed_once(backend_url, tmp_path):
    # A replay that crashed after its insert and before removing the file
    # runs again on the next start: the rows must not be stored twice.
    store = Store(backend_url)
    spill_path = tmp_path / "spill.jsonl"
    events = [CostEvent(provider="anthropic", model=MODEL, usage=Usage(output_tokens=i)) for i in range(5)]
    first = Recorder(store, spill_path=spill_path)
    assert first._try_spill(events)
    first._spill.close()
    replaying = spill_path.with_name(spill_path.name + ".replaying")
    os.replace(spill_path, replaying)
    store.insert_events([event.to_row() for event in events[:3]])

    second = Recorder(store, spill_path=spill_path)
    queued_before = second.queued
    flushed = second.flush(timeout_seconds=10)
    second.close(timeout_seconds=2)
    stored = stored_event_ids(store)
    store.dispose()

    assert queued_before == 5
    assert flushed is True
    assert sorted(stored) == sorted(event.event_id for event in events)
    assert not replaying.exists()


SPILLING_PROCESS = textwrap.dedent(
    """
    import sys
    from llmcost_mw.events import CostEvent
    from llmcost_mw.recorder import Recorder
    from llmcost_mw.store import Store
    from llmcost_mw.usage import Usage

    url, spill_path, worker, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    recorder = Recorder(Store(url), spill_path=spill_path)
    for seq in range(count):
        event = CostEvent(provider="anthropic", model="m", usage=Usage(), event_id=f"w{worker}s{seq:028d}")
        # What record() does past the queue bound, without waiting for a full queue.
        assert recorder._try_spill([event])
    recorder._spill.close()
    """
)


def test_spill_shared_with_concurrent_replay(db_path, tmp_path):
    # Processes append to one spill file while this one replays it again and
    # again: an append must never land in a file that is being replayed.
    url = f"sqlite:///{db_path}"
    store = Store(url)
    store.ensure_schema()
    spill_path = tmp_path / "spill.jsonl"
    workers, count = 3, 2000
    children = [
        subprocess.Popen(
            [sys.executable, "-c", SPILLING_PROCESS, url, str(spill_path), str(worker), str(count)]
        )
        for worker in range(workers)
    ]
    recorder = Recorder(store, spill_path=spill_path)
    replays = 0
    while any(child.poll() is None for child in children):
        replays += recorder._replay_spill()
        time.sleep(0.01)
    returncodes = [child.wait() for child in children]
    assert recorder.flush(timeout_seconds=30)
    recorder.close(timeout_seconds=2)
    stored = stored_event_ids(store)
    store.dispose()

    assert returncodes == [0] * workers
    assert replays >= 2
    assert len(stored) == workers * count
    assert len(set(stored)) == workers * count
    assert not spill_path.exists()


def test_rejected_row_set_aside(backend_url, tmp_path, caplog):
    # A row that the store rejects (NOT NULL on provider) must not hold back
    # the rows of its batch or the events after it.
    store = Store(backend_url)
    spill_path = tmp_path / "spill.jsonl"
    events = [CostEvent(provider="anthropic", model=MODEL, usage=Usage(output_tokens=i)) for i in range(20)]
    events[7].provider = None
    later = CostEvent(provider="anthropic", model=MODEL, usage=Usage())
    recorder = Recorder(store, spill_path=spill_path, flush_interval_seconds=30)
    try:
        for event in events:
            recorder.record(event)
        flushed = recorder.flush(timeout_seconds=30)
        recorder.record(later)
        flushed_later = recorder.flush(timeout_seconds=30)
    finally:
        recorder.close(timeout_seconds=2)
    stored = stored_event_ids(store)
    store.dispose()
    rejected_path = spill_path.with_name(spill_path.name + ".rejected")
    rejected = [json.loads(line) for line in rejected_path.read_text("utf-8").splitlines()]
    errors = [record for record in recorder_log_lines(caplog) if record.levelno >= logging.ERROR]

    assert flushed is True
    assert flushed_later is True
    assert sorted(stored) == sorted(event.event_id for event in [*events[:7], *events[8:], later])
    assert [entry["row"]["event_id"] for entry in rejected] == [events[7].event_id]
    assert rejected[0]["error"]
    assert len(errors) == 1


def test_batch_all_rejected_set_aside(db_path, tmp_path):
    # No row of the batch can be written, but the store takes a write that
    # reads the table, so the rows are at fault: they go to the rejected file.
    store = Store(f"sqlite:///{db_path}")
    spill_path = tmp_path / "spill.jsonl"
    events = [CostEvent(provider=None, model=MODEL, usage=Usage()) for _ in range(5)]
    recorder = Recorder(store, spill_path=spill_path, flush_interval_seconds=0.05)
    for event in events:
        recorder.record(event)
    flushed = recorder.flush(timeout_seconds=5)
    recorder.close(timeout_seconds=1)
    later = Recorder(store, spill_path=spill_path, flush_interval_seconds=0.05)
    later.record(CostEvent(provider="anthropic", model=MODEL, usage=Usage()))
    later_flushed = later.flush(timeout_seconds=5)
    later.close(timeout_seconds=1)
    count = store.count_events()
    store.dispose()
    rejected_path = spill_path.with_name(spill_path.name + ".rejected")
    rejected = [json.loads(line)["row"]["event_id"] for line in rejected_path.read_text("utf-8").splitlines()]

    assert flushed is True
    assert sorted(rejected) == sorted(event.event_id for event in events)
    assert later_flushed is True
    assert count == 1


def test_batch_all_rejected_retried_when_store_fails(db_path, tmp_path, monkeypatch):
    # When no row can be written and the store cannot take a plain write
    # either, the store is the likely cause: the batch waits for a retry.
    store = Store(f"sqlite:///{db_path}")
    spill_path = tmp_path / "spill.jsonl"
    events = [CostEvent(provider=None, model=MODEL, usage=Usage()) for _ in range(5)]

    def unavailable():
        raise sa.exc.OperationalError("SELECT", {}, Exception("the store is down"))

    monkeypatch.setattr(store, "check_writable", unavailable)
    recorder = Recorder(store, spill_path=spill_path, flush_interval_seconds=0.05)
    try:
        for event in events:
            recorder.record(event)
        flushed = recorder.flush(timeout_seconds=1)
        queued = recorder.queued
    finally:
        recorder._queue.clear()
        recorder.close(timeout_seconds=1)
    store.dispose()

    assert flushed is False
    assert queued == 5
    assert not spill_path.with_name(spill_path.name + ".rejected").exists()


# -- process exit ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from llmcost_mw.events import CostEvent
    from llmcost_mw.recorder import Recorder
    from llmcost_mw.store import Store
    from llmcost_mw.usage import Usage

    url, spill_path, mode, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = Store(url)
    store.ensure_schema()
    # A long interval and a large batch: only the exit path writes in the
    # exit and SIGTERM modes.
    options = {
        "exit": {"flush_interval_seconds": 60, "batch_size": 100_000},
        "sigterm": {"flush_interval_seconds": 60, "batch_size": 100_000},
        "sync": {"durability": "sync"},
        "steady": {},
    }[mode]
    recorder = Recorder(store, spill_path=spill_path, **options)
    write_log = os.environ.get("WRITE_LOG")
    recorded = 0
    if write_log:
        log_fd = os.open(write_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        insert = store.insert_values

        def logged_insert(rows):
            before = recorded
            started = time.time()
            inserted = insert(rows)
            os.write(log_fd, f"{before} {started} {time.time()}\\n".encode())
            return inserted

        store.insert_values = logged_insert

    interval = 0.002 if mode == "steady" else 0.0
    for seq in range(count):
        recorder.record(
            CostEvent(provider="anthropic", model="m", usage=Usage(), event_id=f"seq{seq:029d}")
        )
        recorded = seq + 1
        if mode in ("sync", "steady"):
            print(seq, time.time(), flush=True)
        if interval:
            time.sleep(interval)
    print("recorded", flush=True)
    if mode in ("sigterm", "sync", "steady"):
        time.sleep(120)
    """
)


def start_child(url: str, tmp_path: Path, mode: str, count: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(tmp_path / "spill.jsonl"), mode, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def stored_sequence_numbers(url: str) -> list[int]:
    store = Store(url)
    try:
        return sorted(int(event_id[3:]) for event_id in stored_event_ids(store))
    finally:
        store.dispose()


def test_exit_writes_queue(backend_url, tmp_path):
    count = 5000
    child = start_child(backend_url, tmp_path, "exit", count)
    _out, err = child.communicate(timeout=60)

    assert child.returncode == 0, err
    assert stored_sequence_numbers(backend_url) == list(range(count))


def test_sigterm_writes_queue(backend_url, tmp_path):
    count = 5000
    child = start_child(backend_url, tmp_path, "sigterm", count)
    try:
        assert child.stdout.readline().strip() == "recorded"
        rows_before_signal = len(stored_sequence_numbers(backend_url))
        child.send_signal(signal.SIGTERM)
        _out, err = child.communicate(timeout=60)
    finally:
        child.kill()

    assert rows_before_signal == 0
    assert child.returncode == 128 + signal.SIGTERM, err
    assert stored_sequence_numbers(backend_url) == list(range(count))


def read_until_sequence(child: subprocess.Popen, sequence: int) -> None:
    for line in child.stdout:
        if int(line.split()[0]) >= sequence:
            return
    raise AssertionError(f"the child ended before recording event {sequence}: {child.stderr.read()}")


def printed_sequences(output: str) -> list[tuple[int, float]]:
    lines = [line.split() for line in output.splitlines() if line and line[0].isdigit()]
    return [(int(seq), float(at)) for seq, at in lines]


def test_sync_sigkill_loses_nothing(backend_url, tmp_path):
    child = start_child(backend_url, tmp_path, "sync", 100_000)
    try:
        read_until_sequence(child, 200)
        child.kill()
        rest, _err = child.communicate(timeout=30)
    finally:
        child.kill()
    # Every event whose record() returned was printed; the pipe keeps what
    # the killed process printed after the line read above.
    last_printed = max([200, *(seq for seq, _ in printed_sequences(rest))])
    stored = stored_sequence_numbers(backend_url)

    assert stored[: last_printed + 1] == list(range(last_printed + 1))


def test_batch_sigkill_loses_last_interval(db_path, tmp_path):
    # The default durability at a steady 500 events per second: a SIGKILL
    # loses at most what was recorded in the last flush interval plus the
    # write in progress.
    url = f"sqlite:///{db_path}"
    write_log = tmp_path / "writes.log"
    flush_interval_seconds = Recorder.__init__.__kwdefaults__["flush_interval_seconds"]
    child = start_child(url, tmp_path, "steady", 100_000, WRITE_LOG=str(write_log))
    try:
        printed = printed_sequences("".join(itertools.islice(child.stdout, 700)))
        child.kill()
        rest, _err = child.communicate(timeout=30)
    finally:
        child.kill()
    printed += printed_sequences(rest)
    recorded_at = dict(printed)
    last_seq, last_at = printed[-1]
    writes = [tuple(float(part) for part in line.split()) for line in write_log.read_text().splitlines()]
    stored = set(stored_sequence_numbers(url))
    missing = [seq for seq in range(last_seq + 1) if seq not in stored]
    recorded_before_last_write = int(writes[-1][0])
    longest_write_seconds = max(end - start for _, start, end in writes)
    # Scheduling delays of a loaded test machine, on top of the documented bound.
    slack_seconds = 0.25

    assert len(writes) >= 3
    assert all(seq in stored for seq in range(recorded_before_last_write))
    assert all(seq >= recorded_before_last_write for seq in missing)
    if missing:
        missing_span_seconds = last_at - recorded_at[missing[0]]
        assert missing_span_seconds <= flush_interval_seconds + longest_write_seconds + slack_seconds


def test_recorder_docs_state_worst_case():
    docs = Path(__file__).resolve().parents[1] / "docs" / "durability.md"
    text = docs.read_text("utf-8")

    assert "## Durability" in text
    assert "flush_interval_seconds" in text
    assert json.dumps(Recorder.__init__.__kwdefaults__["flush_interval_seconds"]) in text
