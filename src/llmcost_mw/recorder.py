"""The recorder: queues cost events on the caller's thread and writes them in batches.

A background writer drains the queue into one transaction per batch. While
the store is unavailable, events wait in memory up to `max_queue_events` and
then spill to an append-only file, which is replayed once the store is back,
so an event is never dropped. At exit, and on SIGTERM when the process has
no handler of its own, everything queued is written (or, if the store is
still unavailable, spilled) before the process ends.

Worst case with the default `durability="batch"`: a SIGKILL loses the events
recorded since the last write started, that is those of the last
`flush_interval_seconds` (0.2 s) plus the time one batch write takes.
`durability="sync"` writes each event on the caller's thread instead.
docs/durability.md describes each failure.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import sqlalchemy as sa

from .errors import ConfigurationError
from .events import CostEvent
from .store import INSERT_COLUMNS, Store, cost_events

__all__ = ["Recorder"]

logger = logging.getLogger(__name__)

_DURABILITY = ("batch", "sync")

# How many times `batch_size` one transaction takes while a backlog waits.
BACKLOG_BATCH_FACTOR = 5

# Errors caused by the values of a row, which no retry fixes: a NOT NULL
# column left empty, a number out of the column's range, and values the
# driver cannot bind at all (an integer over 64 bits, text that UTF-8
# cannot encode), which sqlite3 and psycopg raise before SQL runs.
_ROW_ERRORS = (
    sa.exc.DataError,
    sa.exc.IntegrityError,
    sa.exc.ProgrammingError,
    sqlite3.ProgrammingError,
    OverflowError,
    UnicodeError,
    TypeError,
    ValueError,
)

# The inserted values of one row, in `INSERT_COLUMNS` order.
_Values = tuple[Any, ...]
# A row that the store rejected, with the error it raised.
_Rejected = tuple[_Values, Exception]
_T = TypeVar("_T")


class _RateLimitedLog:
    """Logs a repeated error at most once per interval, with the count of repeats."""

    def __init__(self, interval_seconds: float = 30.0) -> None:
        self.interval_seconds = interval_seconds
        self._last = 0.0
        self._suppressed = 0

    def error(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_seconds:
            if self._suppressed:
                message += " (%d similar errors suppressed)"
                args = (*args, self._suppressed)
            logger.error(message, *args)
            self._last = now
            self._suppressed = 0
        else:
            self._suppressed += 1


class Recorder:
    """Writes cost events to a store without blocking the caller."""

    def __init__(
        self,
        store: Store,
        *,
        durability: str = "batch",
        max_queue_events: int = 100_000,
        batch_size: int = 1_000,
        flush_interval_seconds: float = 0.2,
        spill_path: str | os.PathLike[str] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        if durability not in _DURABILITY:
            raise ConfigurationError(f"invalid durability {durability!r}: use 'batch' (default) or 'sync'")
        if max_queue_events < 1 or batch_size < 1:
            raise ConfigurationError("max_queue_events and batch_size must be at least 1")
        if flush_interval_seconds <= 0:
            raise ConfigurationError(
                f"invalid flush_interval_seconds {flush_interval_seconds!r}: use a number of seconds above 0"
            )
        self.store = store
        self.durability = durability
        self.max_queue_events = max_queue_events
        self.batch_size = batch_size
        self.flush_interval_seconds = flush_interval_seconds
        self.spill_path = Path(spill_path) if spill_path is not None else _default_spill_path(store)
        self._on_queue_depth = on_queue_depth

        self._queue: deque[CostEvent] = deque()
        self._in_flight: list[CostEvent] = []
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._spill = _SpillFile(self.spill_path)
        # Set by the writer: the monotonic start of the write in progress (0.0
        # when idle), and whether the last write failed. While the store is
        # slow or down, record() reports the queue depth itself, since the
        # writer cannot until its write returns.
        self._write_started = 0.0
        self._failing = False
        self._failed_attempts = 0
        self._stopping = False
        # Set by the atexit hook. Past it, no writer thread can start (Python
        # would wait for it forever), so events go to the spill file.
        self._exited = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._errors = _RateLimitedLog()
        self.written = 0
        os.register_at_fork(after_in_child=self._after_fork)

    @property
    def spilled(self) -> int:
        """Events that this recorder appended to the spill file since it started."""
        return self._spill.appended

    @property
    def queued(self) -> int:
        """Events not yet written: in memory, in the batch being written, and spilled."""
        return len(self._queue) + len(self._in_flight) + self._spill.count

    def record(self, event: CostEvent) -> None:
        """Queue one event. Never raises and never blocks on the store.

        Past `max_queue_events` the event is appended to the spill file on
        the caller's thread, without fsync: a write to the page cache takes
        microseconds, where an fsync per event could take milliseconds.
        """
        if self.durability == "sync" and self._write_now(event):
            return
        if self._exited or sys.is_finalizing():
            # A stream that Python closes while it shuts down ends here.
            self._spill_at_exit(event)
            return
        if len(self._queue) < self.max_queue_events or not self._try_spill([event]):
            # Past the bound the event goes to disk; if even that fails it
            # stays in memory, since losing it is worse than the memory.
            self._queue.append(event)
        if self._thread is None:
            self.start()
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        write_started = self._write_started
        stalled = write_started and time.monotonic() - write_started > self.flush_interval_seconds
        if self._failing or stalled:
            self._report_depth()

    def flush(self, timeout_seconds: float | None = 30.0, *, include_spilled: bool = True) -> bool:
        """Wait until every queued (and, by default, spilled) event is written; return False on timeout."""

        def pending() -> bool:
            return bool(self._queue or self._in_flight or (include_spilled and self._spill.has_events()))

        if not pending():
            return True
        if self._thread is None or not self._thread.is_alive():
            self._thread = None
            self.start()
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        with self._idle:
            while pending():
                self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(timeout=0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Write what is queued in memory, then stop the writer.

        Events that could not be written within the timeout are spilled to
        disk (with fsync) and written by the next recorder on the same store.
        Events already spilled stay there; closing does not wait for them.
        """
        self.flush(timeout_seconds, include_spilled=False)
        self._stopping = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        atexit.unregister(self._close_at_exit)
        leftover = list(self._queue)
        if thread is not None and thread.is_alive():
            # The writer is stuck in a write that may still fail after this
            # process is gone, so its batch is saved too. Should the write
            # succeed, the replay skips the batch's event ids.
            leftover.extend(self._in_flight)
        if leftover:
            self._queue.clear()
            if self._try_spill(leftover):
                logger.error(
                    "the store at %s was unavailable at exit; %d events were saved to %s and will be "
                    "written on the next start",
                    self.store.safe_url,
                    len(leftover),
                    self.spill_path,
                )
        self._spill.close()

    def start(self) -> None:
        """Start the background writer; `record()` starts it on first use otherwise."""
        with self._start_lock:
            if self._thread is not None:
                return
            self._stopping = False
            # An empty context: the writer must never run with the attribution
            # of the request that happened to start it.
            empty = contextvars.Context()
            self._thread = threading.Thread(
                target=empty.run, args=(self._run,), name="llmcost-recorder", daemon=True
            )
            self._thread.start()
            atexit.register(self._close_at_exit)
            _install_sigterm_handler()

    def _close_at_exit(self) -> None:
        self._exited = True
        self.close()

    def _spill_at_exit(self, event: CostEvent) -> None:
        """Save an event recorded after the exit hook ran; the next recorder on the store writes it."""
        if self._try_spill([event]):
            self._spill.close()
            logger.warning(
                "cost event %s was recorded during interpreter exit and saved to %s; "
                "it is written on the next start",
                event.event_id,
                self.spill_path,
            )

    def _after_fork(self) -> None:
        # The writer thread does not exist in a forked child; start a new one
        # on the child's first event.
        self._thread = None
        self._start_lock = threading.Lock()
        self._spill.after_fork()
        self._idle = threading.Condition()
        self._wake = threading.Event()
        self._queue = deque()
        self._in_flight = []
        self._write_started = 0.0
        self._failing = False

    def _write_now(self, event: CostEvent) -> bool:
        try:
            self.store.insert_values([self.store.event_values(event)])
        except Exception as exc:
            self._failing = True
            self._failed_attempts += 1
            self._errors.error(
                "writing a cost event to %s failed, queued instead: %s", self.store.safe_url, exc
            )
            return False
        self.written += 1
        return True

    def _run(self) -> None:
        backoff = 0.0
        while True:
            self._wake.wait(timeout=max(self.flush_interval_seconds, backoff))
            self._wake.clear()
            try:
                drained = self._drain()
                replayed = not self._queue and self._replay_spill()
                backoff = 0.0
                if drained or replayed:
                    self._recovered()
            except Exception as exc:
                self._failing = True
                self._failed_attempts += 1
                self._errors.error(
                    "writing cost events to %s failed; %d events wait and will be retried: %s",
                    self.store.safe_url,
                    self.queued,
                    exc,
                )
                backoff = min(max(backoff * 2, 0.1), 5.0)
                drained = False
                if self._stopping:
                    break
            finally:
                self._write_started = 0.0
            self._report_depth()
            with self._idle:
                self._idle.notify_all()
            if self._stopping and not drained and not self._queue:
                break

    def _recovered(self) -> None:
        if not self._failing:
            return
        self._failing = False
        logger.warning(
            "the store at %s is available again after %d failed write attempts; "
            "the waiting events are written",
            self.store.safe_url,
            self._failed_attempts,
        )
        self._failed_attempts = 0

    def _drain(self) -> bool:
        """Write the queue in batches; return True when anything was written."""
        wrote = False
        while self._queue:
            # A backlog is written in larger transactions: the commit, which
            # writes every changed page to the WAL, is paid once per batch.
            size = self.batch_size * (BACKLOG_BATCH_FACTOR if len(self._queue) > 2 * self.batch_size else 1)
            batch: list[CostEvent] = []
            while self._queue and len(batch) < size:
                batch.append(self._queue.popleft())
            self._in_flight = batch
            self._write_started = time.monotonic()
            try:
                self._insert_rows(self._build(batch, self.store.event_values), store_works=wrote)
            except Exception:
                # Back to the front, in order, to be retried.
                self._queue.extendleft(reversed(batch))
                raise
            finally:
                self._in_flight = []
            self.written += len(batch)
            wrote = True
        return wrote

    def _build(self, events: list[CostEvent], build: Callable[[CostEvent], _T]) -> list[_T]:
        """Build the rows of events; an event whose row cannot be built is logged and left out."""
        rows = []
        for event in events:
            try:
                rows.append(build(event))
            except Exception:
                logger.exception("cannot build the row of cost event %s; it is not written", event.event_id)
        return rows

    def _insert_rows(
        self, rows: list[_Values], *, store_works: bool = False, set_aside: list[_Rejected] | None = None
    ) -> None:
        """Insert rows in one transaction, or find and set aside the rows that the store rejects.

        When the store rejects a batch for its values, the batch is split in
        halves until the rejected rows stand alone. Those go to the rejected
        file (or to `set_aside`, for the caller to save) and the others are
        written. When no row could be written, the rows are rejected only if
        the store is known to work: `store_works` (another write of this
        pass succeeded) or a write transaction that reads the table
        succeeds now. Otherwise this raises, and the batch is retried later.
        """
        try:
            self.store.insert_values(rows)
            return
        except _ROW_ERRORS as exc:
            batch_error = exc
        rejected: list[_Rejected] = []
        written = self._insert_halves(rows, rejected) if len(rows) > 1 else 0
        if len(rows) == 1:
            rejected.append((rows[0], batch_error))
        if not written and not store_works and not self._store_accepts_writes():
            raise batch_error
        if set_aside is not None:
            set_aside.extend(rejected)
            return
        for row, error in rejected:
            self._reject(row, error)

    def _store_accepts_writes(self) -> bool:
        try:
            self.store.check_writable()
        except Exception:
            return False
        return True

    def _insert_halves(self, rows: list[_Values], rejected: list[_Rejected]) -> int:
        """Insert both halves of rows, splitting each that fails; return the number of rows written."""
        if len(rows) == 1:
            try:
                self.store.insert_values(rows)
            except _ROW_ERRORS as exc:
                rejected.append((rows[0], exc))
                return 0
            return 1
        middle = len(rows) // 2
        written = 0
        for part in (rows[:middle], rows[middle:]):
            try:
                self.store.insert_values(part)
                written += len(part)
            except _ROW_ERRORS:
                written += self._insert_halves(part, rejected)
        return written

    def _reject(self, values: _Values, error: Exception) -> None:
        """Save a row that the store rejects to the rejected file, to be fixed and loaded by hand."""
        row = dict(zip(INSERT_COLUMNS, values, strict=True))
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if not self._save_rejected({"error": message, "row": row}):
            return
        self._errors.error(
            "the store at %s rejected cost event %s (%s); its row was saved to %s",
            self.store.safe_url,
            row.get("event_id"),
            message,
            _rejected_path(self.spill_path),
        )

    def _save_rejected(self, record: dict[str, Any]) -> bool:
        """Append a record to the rejected file; return False (and log the loss) when it cannot be written."""
        path = _rejected_path(self.spill_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as rejected:
                # default=str: the row may hold the very value that the store rejected.
                rejected.write(json.dumps(record, default=str) + "\n")
        except OSError as exc:
            event_id = record.get("row", {}).get("event_id", "from the spill file")
            logger.error("cannot write the rejected file %s (%s); cost event %s is lost", path, exc, event_id)
            return False
        return True

    def _try_spill(self, events: list[CostEvent]) -> bool:
        """Append events to the spill file; return False (and log) when the file cannot be written."""
        rows = self._build(events, _spill_values)
        lines = "".join(_encode_spilled(row) + "\n" for row in rows)
        try:
            self._spill.append(lines.encode("utf-8"), len(rows))
        except OSError as exc:
            self._errors.error(
                "cannot write the spill file %s (%s); %d events stay in memory",
                self.spill_path,
                exc,
                len(events),
            )
            return False
        return True

    def _replay_spill(self) -> bool:
        """Write the spill file to the store; return False when there was none to write.

        The file is read and written a transaction at a time, so a file
        longer than the queue bound never sits in memory whole. Lines that
        cannot be read and rows that the store rejects are saved to the
        rejected file once the whole file is written, so that a replay
        retried after a failure does not save them twice.
        """
        if not self._spill.has_events():
            return False
        size = self.batch_size * BACKLOG_BATCH_FACTOR
        with self._spill.replaying() as replaying:
            if replaying is None:
                return False
            written = 0
            unreadable: list[tuple[int, str, str]] = []
            rejected: list[_Rejected] = []
            rows: list[_Values] = []
            with open(replaying, "rb") as spilled:
                for line_number, raw in enumerate(spilled, 1):
                    if not raw.strip():
                        continue
                    try:
                        rows.append(self.store.row_values(_decode_spilled(raw.decode("utf-8"))))
                    except (ValueError, KeyError, TypeError) as exc:
                        # A torn last line from a crash mid-write, a line
                        # that a later version wrote, or bytes that are not
                        # UTF-8. Only the message is kept: a held exception
                        # keeps its whole traceback alive.
                        line = raw.decode("utf-8", "replace").rstrip("\n")
                        unreadable.append((line_number, line, str(exc)))
                    if len(rows) >= size:
                        self._write_started = time.monotonic()
                        self._insert_rows(rows, store_works=written > 0, set_aside=rejected)
                        written += len(rows)
                        rows = []
            self._write_started = time.monotonic()
            self._insert_rows(rows, store_works=written > 0, set_aside=rejected)
            written += len(rows)
            for line_number, line, message in unreadable:
                self._save_rejected({"error": f"unreadable spill line: {message}", "line": line})
                self._errors.error(
                    "line %d of %s cannot be read (%s); it was saved to %s",
                    line_number,
                    replaying,
                    message,
                    _rejected_path(self.spill_path),
                )
            for values, error in rejected:
                self._reject(values, error)
            # Duplicates are skipped by event id, so a crash before this
            # unlink only causes a harmless second replay.
            os.unlink(replaying)
        self._spill.recount()
        written -= len(rejected)
        self.written += written
        logger.info("wrote %d spilled cost events from %s", written, replaying)
        return True

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            try:
                self._on_queue_depth(self.queued)
            except Exception:
                logger.exception("the queue depth callback failed")


class _SpillFile:
    """The append-only file of events that did not fit in the queue.

    Every process that records into one store shares the file, because the
    default path depends on the store alone. An append takes an exclusive
    `flock` on the file. A replay takes a lock file, so that one process
    replays at a time, and renames the spill file away under the file's
    `flock`. An appender that finds the path renamed reopens it, so no
    event is appended to a file that is being replayed.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.replaying_path = _replaying_path(path)
        self.lock_path = path.with_name(path.name + ".lock")
        self._fd: int | None = None
        self._lock = threading.Lock()
        # Spilled events not yet written, for the queue depth; a process
        # counts its own appends and recounts the lines after a replay.
        self.count = _count_lines(self.path) + _count_lines(self.replaying_path)
        self.appended = 0

    def has_events(self) -> bool:
        return self.path.exists() or self.replaying_path.exists()

    def append(self, data: bytes, events: int) -> None:
        """Append whole lines; on failure, cut the file back to its size before and raise OSError."""
        with self._lock:
            while True:
                fd = self._open()
                _flock(fd, exclusive=True)
                try:
                    if not self._is_current(fd):
                        # A replay renamed the file away: append to the new one.
                        self._close_locked(sync=False)
                        continue
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        # A process died mid-append and left a torn line:
                        # end it, so that it does not swallow these lines.
                        data = b"\n" + data
                    try:
                        _write_all(fd, data)
                    except OSError:
                        # A partial line would merge with the next append
                        # and make both unreadable.
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                        raise
                finally:
                    if self._fd == fd:
                        _flock(fd, exclusive=False)
                self.count += events
                self.appended += events
                return

    @contextlib.contextmanager
    def replaying(self) -> Iterator[Path | None]:
        """Yield the file to replay, or None when there is none or another process replays it.

        The caller writes the file's events and unlinks it while the lock is held.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if not _flock(lock_fd, exclusive=True, blocking=False):
                yield None
                return
            if not self.replaying_path.exists():
                with self._lock:
                    self._close_locked(sync=False)
                if not self._rename_for_replay():
                    yield None
                    return
            yield self.replaying_path
        finally:
            os.close(lock_fd)

    def recount(self) -> None:
        with self._lock:
            self.count = _count_lines(self.path) + _count_lines(self.replaying_path)

    def close(self) -> None:
        """Sync the appended lines to disk and close the file."""
        with self._lock:
            self._close_locked(sync=True)

    def after_fork(self) -> None:
        # The parent's descriptor stays the parent's; this process opens its own.
        self._lock = threading.Lock()
        self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Read access too, to check whether the file ends in a torn line.
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _is_current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _rename_for_replay(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            # Waits for an append in progress in any process.
            _flock(fd, exclusive=True)
            if not self._is_current(fd):
                return False
            os.rename(self.path, self.replaying_path)
            return True
        finally:
            os.close(fd)

    def _close_locked(self, *, sync: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if sync:
                os.fsync(fd)
        except OSError as exc:
            logger.error("cannot sync the spill file %s to disk: %s", self.path, exc)
        finally:
            os.close(fd)


def _flock(fd: int, *, exclusive: bool, blocking: bool = True) -> bool:
    """Lock or unlock `fd` across processes; return False when a non-blocking lock is taken by another."""
    # NOTE: without fcntl (Windows) nothing is locked, so two processes that
    # spill into one file can lose events when one of them replays it.
    if fcntl is None:
        return True
    operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_UN
    if not blocking:
        operation |= fcntl.LOCK_NB
    try:
        fcntl.flock(fd, operation)
    except BlockingIOError:
        return False
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as lines:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: lines.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
    except OSError as exc:
        logger.error("cannot read the spill file %s: %s", path, exc)
        return 0


def _rejected_path(spill_path: Path) -> Path:
    return spill_path.with_name(spill_path.name + ".rejected")


def _replaying_path(spill_path: Path) -> Path:
    return spill_path.with_name(spill_path.name + ".replaying")


def _default_spill_path(store: Store) -> Path:
    database = store.engine.url.database if store.dialect == "sqlite" else None
    if database and database != ":memory:":
        return Path(os.path.abspath(database) + ".spill.jsonl")
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    # A stable digest, so the next process of the same app finds the file.
    key = hashlib.sha256(store.url.encode()).hexdigest()[:12]
    return Path(state_home, "llmcost", f"spill-{store.dialect}-{key}.jsonl")


# A spill line is a JSON array: the layout number, then the values of the
# row in that layout's column order, `ts` as text. Arrays take a third of
# the time of objects to encode, and the encoding runs on the caller's
# thread. A version that changes the inserted columns adds a layout and
# keeps reading the old ones.
_SPILL_LAYOUT = 1
_SPILL_COLUMNS = {_SPILL_LAYOUT: INSERT_COLUMNS}
_encode_json = json.JSONEncoder(separators=(",", ":")).encode


def _spill_values(event: CostEvent) -> _Values:
    return event.values(ts_as_text=True)


def _encode_spilled(values: _Values) -> str:
    return _encode_json([_SPILL_LAYOUT, *values])


def _decode_spilled(line: str) -> dict[str, Any]:
    """Return the row of a spill line; raise ValueError, KeyError or TypeError when it cannot be read."""
    data = json.loads(line)
    if isinstance(data, list):
        layout, *values = data
        # type() rather than isinstance: true and 1.0 are not layouts.
        if type(layout) is not int:
            raise ValueError(f"invalid spill layout {layout!r}")
        row = dict(zip(_SPILL_COLUMNS[layout], values, strict=True))
    else:
        # A JSON object per row: the format of earlier versions.
        row = data
    row["ts"] = datetime.fromisoformat(row["ts"])
    for name, value in row.items():
        expected = _SPILL_TYPES.get(name)
        # SQLite would store a value of the wrong type as it is, so a
        # damaged line would put text where a report sums numbers.
        if expected is not None and value is not None and not _is_of(value, expected):
            raise ValueError(f"invalid {name} {value!r} in a spill line")
    return row


def _column_type(column: sa.Column) -> type:
    if isinstance(column.type, sa.Boolean):
        return bool
    if isinstance(column.type, sa.Integer):
        return int
    if isinstance(column.type, sa.Float):
        return float
    return str


# The Python type of each inserted column but `ts`, which is parsed apart.
_SPILL_TYPES = {name: _column_type(cost_events.c[name]) for name in INSERT_COLUMNS if name != "ts"}


def _is_of(value: Any, expected: type) -> bool:
    if expected is bool or isinstance(value, bool):
        return type(value) is expected
    if expected is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, expected)


_sigterm_installed = False


def _install_sigterm_handler() -> None:
    """Turn SIGTERM into a normal exit so that atexit writes the queue.

    Only when the process has no handler of its own (uvicorn and gunicorn
    install theirs and exit normally) and only from the main thread, where
    Python allows it.
    """
    global _sigterm_installed
    if _sigterm_installed or threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    except (ValueError, OSError):
        return
    _sigterm_installed = True


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)
