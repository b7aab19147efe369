"""Helpers shared by the benchmark scripts: machine facts, the naive logger and RSS readings."""

from __future__ import annotations

import datetime
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any

# The table of the naive design: the contract columns only, and no index.
NAIVE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cost_events (id INTEGER PRIMARY KEY, ts TEXT, provider TEXT, model TEXT, "
    "feature TEXT, user_id TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL, "
    "latency_ms REAL)"
)
NAIVE_INSERT = (
    "INSERT INTO cost_events (ts, provider, model, feature, user_id, prompt_tokens, completion_tokens, "
    "cost_usd, latency_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def machine_summary() -> str:
    """Return one line with the core count, CPU model, Python version and date of this run."""
    return (
        f"{os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def create_naive_table(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(NAIVE_SCHEMA)
    conn.close()


def naive_record(path: Path, values: tuple) -> None:
    """Write one event as the naive design does: connect, insert, commit and close on the caller's thread."""
    conn = sqlite3.connect(path, timeout=60)
    conn.execute(NAIVE_INSERT, values)
    conn.commit()
    conn.close()


def rss_bytes() -> int:
    """Return this process's resident set size (VmRSS in /proc/self/status)."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def naive_values(event: Any) -> tuple:
    """Return the values of one `CostEvent` as the naive design inserts them."""
    return (
        event.ts.isoformat(" "),
        event.provider,
        event.model,
        event.feature,
        event.user_id,
        event.usage.prompt_tokens,
        event.usage.completion_tokens,
        float(event.cost_usd),
        event.latency_ms,
    )
