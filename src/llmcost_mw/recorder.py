"""The recorder: queues cost events on the caller's thread and writes them in batches.

A background writer drains the queue into one transaction per batch. While
the store is unavailable, events wait in memory up to `max_queue_events` and
then spill to an append-only file, which is replayed once the store is back,
so an event is never dropped. At exit, and on SIGTERM when the process has
no handler of its own, everything queued is written before the process ends.

Worst case with the default `durability="batch"`: a SIGKILL loses the events
queued since the last write, at most `flush_interval_seconds` (0.2 s) of
events plus the batch being written. `durability="sync"` writes each event
on the caller's thread instead.
"""

from __future__ import annotations

import atexit
import contextvars
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .events import CostEvent
from .store import Store

__all__ = ["Recorder"]

logger = logging.getLogger(__name__)

_DURABILITY = ("batch", "sync")


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
        self._in_flight = 0
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._spill_lock = threading.Lock()
        self._spilled = self.spill_path.exists() or _replaying_path(self.spill_path).exists()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._errors = _RateLimitedLog()
        self.written = 0
        os.register_at_fork(after_in_child=self._after_fork)

    @property
    def queued(self) -> int:
        """Events not yet written: in memory, in the batch being written, and spilled."""
        return len(self._queue) + self._in_flight

    def record(self, event: CostEvent) -> None:
        """Queue one event. Never raises and never blocks on the store."""
        if self.durability == "sync" and self._write_now(event):
            return
        if len(self._queue) < self.max_queue_events or not self._try_spill([event]):
            # Past the bound the event goes to disk; if even that fails it
            # stays in memory, since losing it is worse than the memory.
            self._queue.append(event)
        if self._thread is None:
            self.start()
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    def flush(self, timeout_seconds: float | None = 30.0, *, include_spilled: bool = True) -> bool:
        """Wait until every queued (and, by default, spilled) event is written; return False on timeout."""

        def pending() -> bool:
            return bool(self._queue or self._in_flight or (include_spilled and self._spilled))

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
        disk and written by the next recorder on the same store. Events
        already spilled stay there; closing does not wait for them.
        """
        self.flush(timeout_seconds, include_spilled=False)
        self._stopping = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5.0)
        atexit.unregister(self.close)
        leftover = list(self._queue)
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
            atexit.register(self.close)
            _install_sigterm_handler()

    def _after_fork(self) -> None:
        # The writer thread does not exist in a forked child; start a new one
        # on the child's first event.
        self._thread = None
        self._start_lock = threading.Lock()
        self._idle = threading.Condition()
        self._wake = threading.Event()
        self._queue = deque()
        self._in_flight = 0

    def _write_now(self, event: CostEvent) -> bool:
        try:
            self.store.insert_events([event.to_row()])
        except Exception as exc:
            self._errors.error("writing a cost event to %s failed, queued instead: %s", self.store.safe_url, exc)
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
                if self._spilled and not self._queue:
                    self._replay_spill()
                backoff = 0.0
            except Exception as exc:
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
            self._report_depth()
            with self._idle:
                self._idle.notify_all()
            if self._stopping and not drained and not self._queue:
                break

    def _drain(self) -> bool:
        """Write the queue in batches; return True when anything was written."""
        wrote = False
        while self._queue:
            batch: list[CostEvent] = []
            while self._queue and len(batch) < self.batch_size:
                batch.append(self._queue.popleft())
            self._in_flight = len(batch)
            try:
                self.store.insert_events([event.to_row() for event in batch])
            except Exception:
                # Back to the front, in order, to be retried.
                self._queue.extendleft(reversed(batch))
                raise
            finally:
                self._in_flight = 0
            self.written += len(batch)
            wrote = True
        return wrote

    def _try_spill(self, events: list[CostEvent]) -> bool:
        """Append events to the spill file; return False (and log) when the file cannot be written."""
        lines = "".join(json.dumps(_encode_row(event.to_row())) + "\n" for event in events)
        try:
            with self._spill_lock:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.spill_path, "a", encoding="utf-8") as spill:
                    spill.write(lines)
                    spill.flush()
                    os.fsync(spill.fileno())
                self._spilled = True
        except OSError as exc:
            self._errors.error(
                "cannot write the spill file %s (%s); %d events stay in memory", self.spill_path, exc, len(events)
            )
            return False
        return True

    def _replay_spill(self) -> None:
        replaying = _replaying_path(self.spill_path)
        with self._spill_lock:
            if not replaying.exists():
                if not self.spill_path.exists():
                    self._spilled = False
                    return
                os.replace(self.spill_path, replaying)
        rows: list[dict[str, Any]] = []
        with open(replaying, encoding="utf-8") as spilled:
            for line_number, line in enumerate(spilled, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(_decode_row(json.loads(line)))
                except (ValueError, KeyError) as exc:
                    # A torn last line from a crash mid-write; the rest is kept.
                    logger.warning("skipping unreadable line %d of %s: %s", line_number, replaying, exc)
        for start in range(0, len(rows), self.batch_size):
            self.store.insert_events(rows[start : start + self.batch_size])
        # Duplicates are skipped by event id, so a crash before this unlink
        # only causes a harmless second replay.
        os.unlink(replaying)
        self.written += len(rows)
        logger.info("wrote %d spilled cost events from %s", len(rows), replaying)
        with self._spill_lock:
            self._spilled = self.spill_path.exists()

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            try:
                self._on_queue_depth(self.queued)
            except Exception:
                logger.exception("the queue depth callback failed")


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


def _encode_row(row: dict[str, Any]) -> dict[str, Any]:
    encoded = dict(row)
    encoded["ts"] = row["ts"].isoformat(sep=" ")
    return encoded


def _decode_row(data: dict[str, Any]) -> dict[str, Any]:
    data["ts"] = datetime.fromisoformat(data["ts"])
    return data


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
