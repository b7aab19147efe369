"""Per-call overhead of the instrumentation on `messages.create`.

Runs the real `anthropic` SDK on an in-process `httpx2.MockTransport`, so the
network plays no part, and compares in one run:

- plain: the SDK without instrumentation;
- instrumented: `instrument()` with the default batched recorder and
  metrics, its writer thread writing to SQLite while the calls run;
- hooks only: the same, but the writer sleeps until the chunk is over, so
  the wall time is the time spent on the caller's thread alone;
- naive: the design this package replaces, which opens a SQLite connection,
  inserts and commits on the caller's thread after every call (no index).

The variants alternate in chunks of --chunk calls (in a rotating order), so
that the load of other processes on a shared machine hits each alike. For
each variant it reports the median wall time per call and the process CPU
time per call. The CPU time of "instrumented" includes the writer thread,
because each of its chunks ends with `flush()`: on a machine without an
idle core, that is the time the writes take from the application.
Targets, for "instrumented": median added wall time at most 30
microseconds and a ratio of at most 1.10.

    python benchmarks/call_overhead.py [--calls 20000] [--naive-calls 500] [--chunk 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import httpx2
from _common import load_average, machine_summary
from prometheus_client import CollectorRegistry

import llmcost_mw
from llmcost_mw.metrics import Metrics
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store

MODEL = "claude-sonnet-4-6"
_ids = itertools.count()


def _handler(request: httpx2.Request) -> httpx2.Response:
    body = {
        "id": f"msg_{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 40,
                  "output_tokens": 7},
    }
    return httpx2.Response(200, headers={"content-type": "application/json"}, content=json.dumps(body).encode())


def _client() -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="bench", base_url="http://api.bench", http_client=httpx2.Client(transport=httpx2.MockTransport(_handler))
    )


def _naive_logger(path: Path):
    """Return a logger that connects, inserts and commits per call, as the design this package replaces does."""
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cost_events (id INTEGER PRIMARY KEY, ts TEXT, provider TEXT, model TEXT, "
            "feature TEXT, user_id TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL, "
            "latency_ms REAL)"
        )

    def log(message: anthropic.types.Message, latency_ms: float) -> None:
        conn = sqlite3.connect(path)
        usage = message.usage
        conn.execute(
            "INSERT INTO cost_events (ts, provider, model, feature, user_id, prompt_tokens, completion_tokens, "
            "cost_usd, latency_ms) VALUES (datetime('now'), ?, ?, ?, ?, ?, ?, ?, ?)",
            ("anthropic", message.model, "bench", "u-1", usage.input_tokens, usage.output_tokens, 0.0, latency_ms),
        )
        conn.commit()
        conn.close()

    return log


def _time_calls(call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--calls", type=int, default=20_000, help="calls of each instrumented and plain variant"
    )
    parser.add_argument("--naive-calls", type=int, default=500, help="calls of the naive variant")
    parser.add_argument("--chunk", type=int, default=100, help="calls per variant before switching")
    args = parser.parse_args()

    print(f"machine: {machine_summary()}; load average {load_average()}")
    workdir = Path(tempfile.mkdtemp(prefix="llmcost-bench-"))
    client = _client()
    request = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}
    log_naive = _naive_logger(workdir / "naive.db")

    def plain() -> None:
        client.messages.create(**request)

    def naive() -> None:
        started = time.perf_counter()
        message = client.messages.create(**request)
        log_naive(message, (time.perf_counter() - started) * 1000)

    store = Store(f"sqlite:///{workdir / 'costs.db'}")
    recorder = Recorder(store, spill_path=workdir / "spill.jsonl")
    # The writer of this one sleeps through a chunk: no interval ends and no batch fills.
    idle_recorder = Recorder(
        store, flush_interval_seconds=3600, batch_size=10**9, spill_path=workdir / "idle-spill.jsonl"
    )
    metrics = Metrics(CollectorRegistry())

    # name: (call, recorder or None, flush counted in the CPU time, calls per chunk)
    variants = {
        "plain": (plain, None, False, args.chunk),
        "instrumented": (plain, recorder, True, args.chunk),
        "hooks only": (plain, idle_recorder, False, args.chunk),
        "naive": (naive, None, False, max(1, args.chunk * args.naive_calls // args.calls)),
    }
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu_seconds = dict.fromkeys(variants, 0.0)

    for _ in range(300):  # warm up imports, pools and caches
        plain()
    order = list(variants)
    for cycle in range(max(1, args.calls // args.chunk)):
        for name in order[cycle % len(order) :] + order[: cycle % len(order)]:
            call, variant_recorder, flush_counted, count = variants[name]
            if variant_recorder is None:
                llmcost_mw.uninstrument()
            else:
                llmcost_mw.instrument(recorder=variant_recorder, metrics=metrics)
            cpu_started = time.process_time()
            wall[name] += _time_calls(call, count)
            if flush_counted:
                variant_recorder.flush()
            cpu_seconds[name] += time.process_time() - cpu_started
            if variant_recorder is not None and not flush_counted:
                variant_recorder.flush()
    llmcost_mw.uninstrument()

    medians = {name: statistics.median(samples) * 1e6 for name, samples in wall.items()}
    cpu_per_call = {name: cpu_seconds[name] / len(wall[name]) * 1e6 for name in wall}
    base = medians["plain"]
    header = f"{'variant':<14}{'calls':>8}{'median us':>12}{'added us':>10}{'ratio':>8}"
    print(f"{header}{'CPU us':>10}{'added':>8}")
    for name, median in medians.items():
        print(
            f"{name:<14}{len(wall[name]):>8}{median:>12.1f}{median - base:>10.1f}{median / base:>8.3f}"
            f"{cpu_per_call[name]:>10.1f}{cpu_per_call[name] - cpu_per_call['plain']:>8.1f}"
        )
    expected = len(wall["instrumented"]) + len(wall["hooks only"])
    written = store.count_events()
    print(f"rows written by the recorders: {written} of {expected}")
    added = medians["instrumented"] - base
    ratio = medians["instrumented"] / base
    if added > 30 or ratio > 1.10 or written != expected:
        print(f"MISSED: added {added:.1f} us (target 30), ratio {ratio:.3f} (target 1.10), "
              f"{written} of {expected} rows")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
