"""Per-call overhead of the instrumentation on `messages.create`.

Runs the real `anthropic` SDK on an in-process `httpx2.MockTransport`, so the
network plays no part, and compares in one run:

- plain: the SDK without instrumentation;
- instrumented: `instrument()` with the default batched recorder and metrics;
- naive: the design this package replaces, which opens a SQLite connection,
  inserts and commits on the caller's thread after every call (no index).

Rounds alternate between the variants so that machine noise hits each alike.
Targets: median added time at most 30 microseconds and a ratio of at most 1.10.

    python benchmarks/call_overhead.py [--calls 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import anthropic
import httpx2
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
    """The per-call connect, insert and commit of the design this package replaces."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per round and variant")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    args = parser.parse_args()

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
    recorder = Recorder(store)
    metrics = Metrics(CollectorRegistry())

    for _ in range(300):  # warm up imports, pools and caches
        plain()

    results: dict[str, list[float]] = {"plain": [], "instrumented": [], "naive": []}
    for _ in range(args.rounds):
        llmcost_mw.uninstrument()
        results["plain"] += _time_calls(plain, args.calls)
        results["naive"] += _time_calls(naive, args.calls)
        llmcost_mw.instrument(recorder=recorder, metrics=metrics)
        results["instrumented"] += _time_calls(plain, args.calls)
    llmcost_mw.uninstrument()
    recorder.flush()

    medians = {name: statistics.median(samples) * 1e6 for name, samples in results.items()}
    base = medians["plain"]
    print(f"{'variant':<14}{'median us':>12}{'added us':>12}{'ratio':>8}")
    for name in ("plain", "instrumented", "naive"):
        print(f"{name:<14}{medians[name]:>12.1f}{medians[name] - base:>12.1f}{medians[name] / base:>8.3f}")
    expected = args.calls * args.rounds
    print(f"rows written by the recorder: {store.count_events()} of {expected}")


if __name__ == "__main__":
    main()
