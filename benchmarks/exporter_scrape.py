"""Time a scrape of `llmcost exporter` on a large SQLite store.

Builds a store of 10 million rows once (cached under /tmp, reused while its
row count matches), loads the exporter's totals, then adds 1,000 rows through
`Store.insert_events` and times one scrape, several times over. The target is
a scrape of 20 ms or less after 1,000 new rows, whatever the table size.

    .venv/bin/python benchmarks/exporter_scrape.py [--rows N] [--new-rows N] [--rounds N]

The rows added by a run are deleted at its end (or at the start of the next
run), so the cached file stays the same between runs. Building 10 million rows takes a few minutes and about
2 GB of disk.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from llmcost_mw.events import CostEvent, utcnow
from llmcost_mw.exporter import StoreCollector
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

DEFAULT_PATH = Path("/tmp/llmcost-bench/exporter-store.db")
TARGET_SCRAPE_SECONDS = 0.020
BUILD_CHUNK_ROWS = 200_000

FEATURES = [f"feature-{n:02d}" for n in range(20)] + [None]
MODELS = ["claude-sonnet-4-6", "claude-opus-4-8", "claude-haiku-4-5", "claude-sonnet-4-5"]
COLUMNS = (
    "id", "event_id", "ts", "provider", "model", "feature", "user_id", "status",
    "prompt_tokens", "completion_tokens", "input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
    "cache_read_tokens", "output_tokens", "reasoning_tokens", "web_search_requests", "web_fetch_requests",
    "cost_usd", "unpriced", "latency_ms", "context_missing",
)


def _generate_rows(count: int, first_ts: datetime, last_ts: datetime) -> Iterator[tuple]:
    """Yield `count` rows whose ts rise evenly from first_ts to last_ts, as in a real ledger."""
    step = (last_ts - first_ts) / max(count - 1, 1)
    for row_id in range(1, count + 1):
        ts = (first_ts + step * (row_id - 1)).strftime("%Y-%m-%d %H:%M:%S.%f")
        input_tokens = 200 + row_id % 3_000
        cache_read = (row_id % 5) * 1_000
        output_tokens = 20 + row_id % 800
        unpriced = row_id % 10_000 == 0
        yield (
            row_id, f"{row_id:032x}", ts, "anthropic", MODELS[row_id % len(MODELS)],
            FEATURES[row_id % len(FEATURES)], f"u-{row_id % 1_000}",
            "error" if row_id % 100 == 0 else "ok",
            input_tokens + cache_read, output_tokens, input_tokens, 0, 0, cache_read, output_tokens, 0, 0, 0,
            None if unpriced else round((input_tokens * 3 + output_tokens * 15 + cache_read * 0.3) / 1e6, 6),
            int(unpriced), 400.0 + row_id % 5_000, 0,
        )


def _build(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store = Store(f"sqlite:///{path}")
    store.ensure_schema()
    store.dispose()

    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    # Loading without the secondary indexes and creating them afterwards is
    # several times faster than updating them row by row.
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master "
        "WHERE type = 'index' AND tbl_name = 'cost_events' AND sql IS NOT NULL"
    ).fetchall()
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')

    now = utcnow()
    generated = _generate_rows(rows, now - timedelta(days=365), now - timedelta(minutes=5))
    placeholders = ", ".join("?" * len(COLUMNS))
    statement = f"INSERT INTO cost_events ({', '.join(COLUMNS)}) VALUES ({placeholders})"
    inserted = 0
    while inserted < rows:
        chunk = list(itertools.islice(generated, BUILD_CHUNK_ROWS))
        conn.execute("BEGIN")
        conn.executemany(statement, chunk)
        conn.execute("COMMIT")
        inserted += len(chunk)
        elapsed = time.perf_counter() - started
        print(f"  inserted {inserted:,} rows ({elapsed:.0f} s)", file=sys.stderr, flush=True)

    for name, sql in indexes:
        conn.execute(sql)
        print(f"  created index {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    conn.execute(
        "INSERT OR REPLACE INTO llmcost_meta (key, value) VALUES ('benchmark_rows', ?)", (str(rows),)
    )
    conn.execute("ANALYZE")
    conn.close()
    print(f"built {rows:,} rows in {time.perf_counter() - started:.0f} s: {path}", file=sys.stderr)


def _cached_rows(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(path)
        try:
            row = conn.execute("SELECT value FROM llmcost_meta WHERE key = 'benchmark_rows'").fetchone()
            max_id = conn.execute("SELECT max(id) FROM cost_events").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    # A run that was stopped before its clean-up leaves extra rows, removed in main().
    if row is None or max_id is None or max_id < int(row[0]):
        return None
    return int(row[0])


def _new_rows(count: int) -> list[dict]:
    now = utcnow()
    usage = Usage(input_tokens=1_200, cache_read_tokens=4_000, output_tokens=350)
    return [
        CostEvent(
            provider="anthropic", model=MODELS[n % len(MODELS)], usage=usage, feature=FEATURES[n % 20],
            user_id=f"u-{n % 50}", ts=now, cost_usd=Decimal("0.00999"), latency_ms=900.0,
        ).to_row()
        for n in range(count)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--rows", type=int, default=10_000_000, help="rows in the store (default: 10,000,000)"
    )
    parser.add_argument("--new-rows", type=int, default=1_000, help="rows added before each timed scrape")
    parser.add_argument("--rounds", type=int, default=7, help="timed scrapes (default: 7)")
    parser.add_argument(
        "--path", type=Path, default=DEFAULT_PATH, help=f"SQLite file (default: {DEFAULT_PATH})"
    )
    args = parser.parse_args()

    if _cached_rows(args.path) != args.rows:
        print(f"building a store of {args.rows:,} rows at {args.path}", file=sys.stderr)
        _build(args.path, args.rows)

    store = Store(f"sqlite:///{args.path}")
    with store.write() as conn:
        conn.exec_driver_sql("DELETE FROM cost_events WHERE id > ?", (args.rows,))
    collector = StoreCollector(store)
    registry = CollectorRegistry()
    registry.register(collector)

    started = time.perf_counter()
    collector.refresh()
    load_seconds = time.perf_counter() - started
    base_id = collector.last_seen_id

    started = time.perf_counter()
    generate_latest(registry)
    idle_seconds = time.perf_counter() - started

    scrape_seconds = []
    insert_seconds = []
    exposition = b""
    try:
        for _ in range(args.rounds):
            rows = _new_rows(args.new_rows)
            started = time.perf_counter()
            store.insert_events(rows)
            insert_seconds.append(time.perf_counter() - started)

            started = time.perf_counter()
            exposition = generate_latest(registry)
            scrape_seconds.append(time.perf_counter() - started)
    finally:
        with store.write() as conn:
            conn.exec_driver_sql("DELETE FROM cost_events WHERE id > ?", (base_id,))
        store.dispose()

    median = statistics.median(scrape_seconds)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    print(f"store: {args.rows:,} rows, {args.path.stat().st_size / 1e9:.2f} GB ({args.path})")
    print(f"first load of the totals: {load_seconds:.2f} s")
    print(f"scrape with no new rows: {idle_seconds * 1e3:.2f} ms")
    print(f"insert of {args.new_rows:,} rows (Store.insert_events): median "
          f"{statistics.median(insert_seconds) * 1e3:.1f} ms")
    print(f"scrape after {args.new_rows:,} new rows, {args.rounds} rounds: median {median * 1e3:.2f} ms, "
          f"min {min(scrape_seconds) * 1e3:.2f} ms, max {max(scrape_seconds) * 1e3:.2f} ms "
          f"(target {TARGET_SCRAPE_SECONDS * 1e3:.0f} ms)")
    print(f"exposition: {len(exposition):,} bytes")
    return 0 if median <= TARGET_SCRAPE_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
