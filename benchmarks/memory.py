"""Resident memory of a process that records 1 million events through the recorder into SQLite.

The events are built one at a time, as calls would produce them, and the
producer pauses whenever more than --max-waiting events wait, so that the
writer keeps up and the figure is the recorder's steady state, not a
backlog. RSS (VmRSS in /proc/self/status) is read after a warm-up of
--warmup events, then after every 100,000 events; VmHWM gives the peak.

The naive design (connect, insert, commit per event, no index) runs in the
same process first, for --naive-events events. It keeps nothing in memory,
so its growth is the baseline of the interpreter itself.

Target: RSS grows by at most 50 MB while 1 million events are recorded.

    python benchmarks/memory.py [--events 1000000] [--max-waiting 5000]
"""

from __future__ import annotations

import argparse
import gc
import secrets
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from _common import create_naive_table, load_average, machine_summary, naive_record, naive_values, rss_bytes

from llmcost_mw.events import CostEvent
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

TARGET_MB = 50.0
MB = 1024 * 1024


def make_event(seq: int) -> CostEvent:
    return CostEvent(
        provider="anthropic",
        model="claude-sonnet-4-5-20250929",
        usage=Usage(input_tokens=1200, cache_read_tokens=3000, output_tokens=350),
        user_id=f"user-{seq % 5000}",
        feature=f"feature-{seq % 12}",
        request_id=f"{seq:032x}",
        response_id=f"msg_{secrets.token_urlsafe(18)}",
        cost_usd=Decimal("0.0123"),
        latency_ms=812.5,
    )


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def run_naive(path: Path, events: int) -> float:
    create_naive_table(path)
    gc.collect()
    before = rss_bytes()
    for seq in range(events):
        naive_record(path, naive_values(make_event(seq)))
    gc.collect()
    return (rss_bytes() - before) / MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events recorded after the warm-up")
    parser.add_argument(
        "--warmup", type=int, default=20_000, help="events recorded before the first reading"
    )
    parser.add_argument(
        "--max-waiting", type=int, default=5_000, help="pause while more events than this wait"
    )
    parser.add_argument("--naive-events", type=int, default=2_000, help="events of the naive variant")
    args = parser.parse_args()

    print(f"machine: {machine_summary()}; load average {load_average()}")
    workdir = Path(tempfile.mkdtemp(prefix="llmcost-memory-"))
    naive_growth = run_naive(workdir / "naive.db", args.naive_events)

    store = Store(f"sqlite:///{workdir / 'costs.db'}")
    recorder = Recorder(store, spill_path=workdir / "spill.jsonl")
    for seq in range(args.warmup):
        recorder.record(make_event(seq))
    recorder.flush(timeout_seconds=120)
    gc.collect()
    before = rss_bytes()
    started = time.perf_counter()
    readings = []
    max_waiting_seen = 0
    for seq in range(args.warmup, args.warmup + args.events):
        recorder.record(make_event(seq))
        if seq % 1000 == 0:
            waiting = recorder.queued
            max_waiting_seen = max(max_waiting_seen, waiting)
            while recorder.queued > args.max_waiting:
                time.sleep(0.005)
        if (seq - args.warmup + 1) % 100_000 == 0:
            readings.append((seq - args.warmup + 1, (rss_bytes() - before) / MB))
    if not recorder.flush(timeout_seconds=300):
        raise RuntimeError("the recorder did not write every event within 300 s")
    elapsed = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    recorder.close()
    written = store.count_events()
    store.dispose()

    growth = (after - before) / MB
    print(f"recorded {args.events:,} events in {elapsed:.1f} s ({args.events / elapsed:,.0f} events/s), "
          f"{written:,} rows in the store, at most {max_waiting_seen:,} waiting")
    print(f"RSS before {before / MB:.1f} MB, after {after / MB:.1f} MB, growth {growth:.1f} MB "
          f"(target {TARGET_MB:.0f} MB); peak RSS of the process {peak_rss_bytes() / MB:.1f} MB")
    print("growth after N events: " + ", ".join(f"{count // 1000}k {mb:.1f} MB" for count, mb in readings))
    print(f"naive design, {args.naive_events:,} events: growth {naive_growth:.1f} MB")
    if written != args.warmup + args.events:
        print(f"MISSED: {written:,} rows written of {args.warmup + args.events:,}")
        return 1
    if growth > TARGET_MB:
        print("MISSED: RSS grew by more than the target")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
