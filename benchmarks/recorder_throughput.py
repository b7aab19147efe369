"""Events per second that the recorder writes, from several threads or processes into one store.

Each variant starts from an empty store, builds its events before the clock
starts, then times `record()` of every event until `flush()` returns, and
checks afterwards that every event is in the table. Variants:

- 4 threads of one process into one SQLite file (target 50,000 events/s),
  with as many events as the queue holds (`max_queue_events`, 100,000), so
  that the figure is the writer's rate; the median of three runs;
- the same with twice as many events, no target: past the queue bound each
  further event is appended to the spill file on the caller's thread and
  replayed later, so this measures the overload path;
- 4 processes into one SQLite file (target 20,000 events/s together);
- 4 processes into PostgreSQL, a throwaway server from tests/postgres_server.py
  (target 20,000 events/s together; skipped when PostgreSQL is missing);
- the naive design in the same run: a `sqlite3.connect`, insert and commit
  per event on the caller's thread, into a table without indexes, from 4
  threads and from 4 processes.

The processes are started and import everything before a common start
signal, so start-up time is not counted.

    python benchmarks/recorder_throughput.py [--events 200000] [--naive-events 2000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

from _common import create_naive_table, load_average, machine_summary, naive_record, naive_values

from llmcost_mw.events import CostEvent
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

WORKERS = 4
TARGETS = {"sqlite, 4 threads": 50_000, "sqlite, 4 processes": 20_000, "postgresql, 4 processes": 20_000}
QUEUE_BOUND = 100_000  # the recorder's default max_queue_events
REPO = Path(__file__).resolve().parents[1]


def make_events(count: int, worker: int) -> list[CostEvent]:
    return [
        CostEvent(
            provider="anthropic",
            model="claude-sonnet-4-5-20250929",
            usage=Usage(input_tokens=1200, cache_read_tokens=3000, output_tokens=350),
            user_id=f"user-{worker}-{seq % 500}",
            feature=f"feature-{seq % 12}",
            request_id=f"{worker:08x}{seq:024x}",
            # Random, like the API's message ids, so the unique index receives random keys.
            response_id=f"msg_{secrets.token_urlsafe(18)}",
            cost_usd=Decimal("0.0123"),
            price_version="2026-01-15",
            price_id="claude-sonnet-4-5",
            latency_ms=812.5,
        )
        for seq in range(count)
    ]


# -- one process, several threads ----------------------------------------------


def run_threads(url: str, events: int, spill_path: Path) -> tuple[float, int]:
    """Return the events per second and how many events went through the spill file."""
    store = Store(url)
    store.ensure_schema()
    recorder = Recorder(store, spill_path=spill_path)
    batches = [make_events(events // WORKERS, worker) for worker in range(WORKERS)]
    barrier = threading.Barrier(WORKERS + 1)

    def produce(batch: list[CostEvent]) -> None:
        barrier.wait()
        for event in batch:
            recorder.record(event)

    threads = [threading.Thread(target=produce, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if not recorder.flush(timeout_seconds=600):
        raise RuntimeError("the recorder did not write every event within 600 s")
    elapsed = time.perf_counter() - started
    recorder.close()
    written = store.count_events()
    store.dispose()
    if written != events // WORKERS * WORKERS:
        raise RuntimeError(f"{written} rows written of {events // WORKERS * WORKERS}")
    return written / elapsed, recorder.spilled


def run_naive_threads(path: Path, events: int) -> float:
    create_naive_table(path)
    batches = [make_events(events // WORKERS, worker) for worker in range(WORKERS)]
    barrier = threading.Barrier(WORKERS + 1)

    def produce(batch: list[CostEvent]) -> None:
        barrier.wait()
        for event in batch:
            naive_record(path, naive_values(event))

    threads = [threading.Thread(target=produce, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return events // WORKERS * WORKERS / (time.perf_counter() - started)


# -- several processes -----------------------------------------------------------


def child_main(mode: str, target: str, worker: int, count: int, spill_path: str) -> None:
    """Build events, wait for the start line on stdin, record them, then print the finish time."""
    events = make_events(count, worker)
    if mode == "recorder":
        store = Store(target)
        store.ensure_schema()
        recorder = Recorder(store, spill_path=spill_path)
    else:
        path = Path(target)
        values = [naive_values(event) for event in events]
    print("ready", flush=True)
    sys.stdin.readline()
    if mode == "recorder":
        for event in events:
            recorder.record(event)
        if not recorder.flush(timeout_seconds=600):
            raise SystemExit("the recorder did not write every event within 600 s")
    else:
        for value in values:
            naive_record(path, value)
    print(time.time(), flush=True)


def run_processes(mode: str, target: str, events: int, workdir: Path) -> float:
    count = events // WORKERS
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--child", mode, target, str(worker), str(count),
             str(workdir / f"spill-{mode}.jsonl")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for worker in range(WORKERS)
    ]
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a {mode} process failed to start")
    started = time.time()
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    finished = []
    for child in children:
        out, _ = child.communicate(timeout=900)
        if child.returncode != 0:
            raise RuntimeError(f"a {mode} process exited with {child.returncode}")
        finished.append(float(out.split()[-1]))
    return count * WORKERS / (max(finished) - started)


def count_rows(url: str) -> int:
    store = Store(url)
    try:
        return store.count_events()
    finally:
        store.dispose()


def start_postgres():
    sys.path.insert(0, str(REPO / "tests"))
    from postgres_server import PostgresServer, find_bindir

    bindir = find_bindir()
    if bindir is None:
        return None
    server = PostgresServer(bindir)
    server.initialize()
    server.start()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per recorder variant")
    parser.add_argument("--naive-events", type=int, default=2_000, help="events per naive variant")
    parser.add_argument("--repeat", type=int, default=3, help="runs of the 4-thread variant (median)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, target, worker, count, spill_path = args.child
        child_main(mode, target, int(worker), int(count), spill_path)
        return 0

    print(f"machine: {machine_summary()}; load average {load_average()}")
    workdir = Path(tempfile.mkdtemp(prefix="llmcost-throughput-"))
    results: dict[str, float] = {}

    runs = []
    for run in range(args.repeat):
        url = f"sqlite:///{workdir / f'threads-{run}.db'}"
        rate, spilled = run_threads(url, QUEUE_BOUND, workdir / "t.jsonl")
        if spilled:
            raise RuntimeError(f"sqlite, 4 threads: {spilled} events spilled below the queue bound")
        runs.append(rate)
    rates = ", ".join(f"{rate:,.0f}" for rate in runs)
    print(f"sqlite, 4 threads, {QUEUE_BOUND:,} events: {rates} events/s")
    results["sqlite, 4 threads"] = statistics.median(runs)
    over = "sqlite, 4 threads, past the bound"
    rate, spilled = run_threads(f"sqlite:///{workdir / 'threads-over.db'}", args.events, workdir / "o.jsonl")
    print(f"{over}: {rate:,.0f} events/s, {spilled:,} of {args.events:,} events through the spill file")
    results[over] = rate
    url = f"sqlite:///{workdir / 'processes.db'}"
    Store(url).ensure_schema()
    results["sqlite, 4 processes"] = run_processes("recorder", url, args.events, workdir)
    if count_rows(url) != args.events // WORKERS * WORKERS:
        raise RuntimeError(f"sqlite, 4 processes: {count_rows(url)} rows written of {args.events}")

    server = start_postgres()
    if server is None:
        print("PostgreSQL is not installed: its variant is skipped")
    else:
        try:
            url = server.create_database()
            Store(url).ensure_schema()
            results["postgresql, 4 processes"] = run_processes("recorder", url, args.events, workdir)
            if count_rows(url) != args.events // WORKERS * WORKERS:
                written = count_rows(url)
                raise RuntimeError(f"postgresql, 4 processes: {written} rows written of {args.events}")
        finally:
            server.destroy()

    results["naive, 4 threads"] = run_naive_threads(workdir / "naive-threads.db", args.naive_events)
    create_naive_table(workdir / "naive-processes.db")
    results["naive, 4 processes"] = run_processes(
        "naive", str(workdir / "naive-processes.db"), args.naive_events, workdir
    )

    naive_best = max(results["naive, 4 threads"], results["naive, 4 processes"])
    missed = []
    print(f"{'variant':<34}{'events/s':>12}{'target':>10}{'x naive':>10}")
    for name, rate in results.items():
        target = TARGETS.get(name)
        print(f"{name:<34}{rate:>12,.0f}{target or '':>10}{rate / naive_best:>10.1f}")
        if target and rate < target:
            missed.append(name)
    print("every recorder variant wrote every event it recorded")
    if missed:
        print(f"MISSED: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
