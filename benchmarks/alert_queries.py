"""Time of the built-in alert rules on large SQLite stores, with their query plans.

Each data set is ROWS events spread evenly over DAYS days that end at the
watcher's clock (a fixed 18:30 UTC, so the day window holds three quarters
of a day). A data set is built once and cached under --cache-dir, since
10 million rows take minutes to generate.

Before timing, the daily roll-ups are brought up to yesterday, as the
watcher's first pass does (once per data set; the time is printed). Then it
reports, warm (after one untimed pass):

- each rule alone (its query and, for a baseline rule, its per-entity
  thresholds) and all rules together, as the median of --repeat runs. The
  rules run as shipped, then with `AND ts <= :now` added after each
  `ts >=` bound that has no upper bound: a range closed on both ends lets
  SQLite's planner pick the ts index without statistics;
- one dry-run pass of `Watcher` with the built-in rules, which adds the
  roll-up refresh and the state lookups of the rows that fire;
- the rules as shipped, forced to read the table without its indexes
  (SQLite's `NOT INDEXED`). This replaces the naive design's table,
  which has no index. They run once, since they take seconds;
- each query plan, flagging steps that read `cost_events` without a bound
  on `ts` (a table scan, or a walk of a whole index).

The default data sets are 10 million rows over a year, 1 million over a
year and 1 million over 36.5 days (the same rows per hour as 10 million over
a year). Target: all rules together in at most 50 ms at 10 million rows.

    python benchmarks/alert_queries.py [--datasets 10000000:365,1000000:36.5] [--repeat 15]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import sqlite3
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from _common import load_average, machine_summary

from llmcost_mw.alerts import Watcher, builtin_rules
from llmcost_mw.retention import refresh_rollups, rolled_up_through
from llmcost_mw.store import Store, cost_events

# The watcher's clock in every data set.
CLOCK = datetime(2026, 3, 2, 18, 30)
TARGET_MS = 50.0
DEFAULT_DATASETS = "10000000:365,1000000:365,1000000:36.5"

FEATURES = [f"feature-{i:02d}" for i in range(40)]
USERS = [f"user-{i:05d}" for i in range(20_000)]
# (model, share of calls, priced): one model in 2,000 is missing from the price table.
MODELS = [
    ("claude-sonnet-4-5-20250929", 0.55, True),
    ("claude-haiku-4-5-20251001", 0.30, True),
    ("claude-opus-4-1-20250805", 0.1495, True),
    ("claude-experimental-x", 0.0005, False),
]
BUILD_CHUNK = 200_000


def dataset_path(cache_dir: Path, rows: int, days: float) -> Path:
    return cache_dir / f"alerts-{rows}-{days:g}d-v1.db"


def build(path: Path, rows: int, days: float) -> float:
    """Create the store at `path` with the package's schema and `rows` generated events.

    Returns the seconds taken.
    """
    started = time.perf_counter()
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    store = Store(f"sqlite:///{partial}")
    store.ensure_schema()
    store.dispose()

    conn = sqlite3.connect(partial, isolation_level=None)
    # Indexes are built after the load, which is several times faster than
    # keeping every index up to date row by row.
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master "
        "WHERE type = 'index' AND tbl_name = 'cost_events' AND sql IS NOT NULL"
    ).fetchall()
    for name, _sql in indexes:
        conn.execute(f"DROP INDEX {name}")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -1000000")

    columns = [column.name for column in cost_events.columns if column.name != "id"]
    insert = f"INSERT INTO cost_events ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    rng = random.Random(rows * 1000 + int(days * 10))
    start = CLOCK - timedelta(days=days)
    step_us = days * 86_400e6 / rows
    model_names = [model for model, _share, _priced in MODELS]
    model_weights = [share for _model, share, _priced in MODELS]
    priced = {model: is_priced for model, _share, is_priced in MODELS}

    for chunk_start in range(0, rows, BUILD_CHUNK):
        batch = []
        for i in range(chunk_start, min(rows, chunk_start + BUILD_CHUNK)):
            # Even spacing with jitter inside the step keeps rows in ts order.
            ts = start + timedelta(microseconds=(i + rng.random()) * step_us)
            model = rng.choices(model_names, model_weights)[0]
            failed = rng.random() < 0.01
            input_tokens = int(rng.expovariate(1 / 1500)) + 1
            output_tokens = 0 if failed else int(rng.expovariate(1 / 400)) + 1
            cache_read = int(rng.expovariate(1 / 3000)) if rng.random() < 0.4 else 0
            cost = None
            if priced[model]:
                cost = round((input_tokens * 3 + output_tokens * 15 + cache_read * 0.3) / 1e6, 6)
                if rng.random() < 0.0005:
                    cost += 0.6  # an expensive call, for the request_cost rule
            batch.append(
                (
                    f"{rng.getrandbits(128):032x}",
                    ts.strftime("%Y-%m-%d %H:%M:%S.%f"),
                    "anthropic",
                    model,
                    model,
                    rng.choice(FEATURES),
                    USERS[min(int(rng.paretovariate(1.2)) - 1, len(USERS) - 1)] if rng.random() < 0.3
                    else rng.choice(USERS),
                    f"{rng.getrandbits(128):032x}",
                    None if failed else f"msg_{rng.getrandbits(96):024x}",
                    "error" if failed else "ok",
                    "InternalServerError" if failed else None,
                    input_tokens + cache_read,
                    output_tokens,
                    input_tokens,
                    0,
                    0,
                    cache_read,
                    output_tokens,
                    0,
                    0,
                    0,
                    cost,
                    0 if priced[model] else 1,
                    "2026-01-15",
                    model if priced[model] else None,
                    None,
                    round(rng.uniform(300, 9000), 3),
                    0,
                    None,
                )
            )
        conn.execute("BEGIN")
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
        done = min(rows, chunk_start + BUILD_CHUNK)
        print(f"  built {done:,} of {rows:,} rows", file=sys.stderr, flush=True)

    for name, sql in indexes:
        conn.execute(sql)
        print(f"  created index {name}", file=sys.stderr, flush=True)
    # No ANALYZE: stores in use have no statistics either, and the
    # planner's choice without them is what the rules get.
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    partial.rename(path)
    return time.perf_counter() - started


def bound_text(rule, sql_text: str) -> sa.TextClause:
    """Bind the rule's parameters, as `Rule.bound_sql` does, to another SQL text."""
    values = rule.binds(CLOCK)
    clause = sa.text(sql_text)
    params = []
    for name in rule.bind_names:
        value = values[name]
        if isinstance(value, datetime):
            params.append(sa.bindparam(name, value, type_=sa.DateTime))
        else:
            params.append(sa.bindparam(name, value))
    return clause.bindparams(*params)


def time_rules(store: Store, rules, repeat: int) -> dict[str, float]:
    """Return the median milliseconds of each rule, and of all rules run back to back as 'all rules'."""
    samples: dict[str, list[float]] = {rule.name: [] for rule in rules}
    samples["all rules"] = []
    with store.read() as conn:
        for rule in rules:
            rule.evaluate(conn, CLOCK)  # warm the page cache
        for _ in range(repeat):
            total = 0.0
            for rule in rules:
                started = time.perf_counter()
                rule.evaluate(conn, CLOCK)
                elapsed = (time.perf_counter() - started) * 1000
                samples[rule.name].append(elapsed)
                total += elapsed
                if rule.entity_thresholds is not None:
                    # The share of the rule's time spent on its per-entity thresholds.
                    started = time.perf_counter()
                    rule.entity_thresholds(conn, rule.binds(CLOCK))
                    samples.setdefault(f"{rule.name}, of which thresholds", []).append(
                        (time.perf_counter() - started) * 1000
                    )
            samples["all rules"].append(total)
    return {name: statistics.median(values) for name, values in samples.items()}


def with_upper_bound(rule):
    """Return the rule with `AND ts <= :now` after each lower bound on ts that has no upper bound."""
    text = re.sub(r"ts >= :(since|day_start)(?! AND ts <= :now)", r"ts >= :\1 AND ts <= :now", rule.sql.text)
    return dataclasses.replace(rule, sql=sa.text(text))


def unbounded_steps(plan: list[str]) -> list[str]:
    """Return the plan steps that read cost_events without a range on ts."""
    return [
        step
        for step in plan
        if re.match(r"(SCAN|SEARCH) cost_events\b", step) and not re.search(r"\bts[<>=]", step)
    ]


def time_without_indexes(store: Store, rules) -> dict[str, float]:
    timings = {}
    with store.read() as conn:
        total = 0.0
        for rule in rules:
            sql = rule.sql.text.replace("FROM cost_events", "FROM cost_events NOT INDEXED")
            started = time.perf_counter()
            conn.execute(bound_text(rule, sql)).fetchall()
            if rule.entity_thresholds is not None:
                rule.entity_thresholds(conn, rule.binds(CLOCK))
            elapsed = (time.perf_counter() - started) * 1000
            timings[rule.name] = elapsed
            total += elapsed
        timings["all rules"] = total
    return timings


def query_plans(store: Store, rules) -> dict[str, list[str]]:
    plans = {}
    with store.read() as conn:
        for rule in rules:
            rows = conn.execute(bound_text(rule, "EXPLAIN QUERY PLAN " + rule.sql.text)).fetchall()
            plans[rule.name] = [row[-1] for row in rows]
    return plans


def window_counts(store: Store) -> dict[str, int]:
    hour = CLOCK - timedelta(hours=1)
    day = datetime.combine(CLOCK.date(), datetime.min.time())
    with store.read() as conn:
        count = sa.text("SELECT count(*) FROM cost_events WHERE ts >= :since").bindparams(
            sa.bindparam("since", type_=sa.DateTime)
        )
        return {
            "last hour": conn.execute(count, {"since": hour}).scalar_one(),
            "since 00:00": conn.execute(count, {"since": day}).scalar_one(),
        }


def time_watcher(store: Store, repeat: int) -> float:
    watcher = Watcher(store, builtin_rules(), None, clock=lambda: CLOCK, dry_run=True)
    watcher.run_once()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        watcher.run_once()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def parse_datasets(text: str) -> list[tuple[int, float]]:
    datasets = []
    for item in text.split(","):
        rows, _, days = item.partition(":")
        try:
            datasets.append((int(rows), float(days or 365)))
        except ValueError:
            raise SystemExit(f"invalid data set {item!r}: use ROWS:DAYS, for example 1000000:365") from None
    return datasets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=DEFAULT_DATASETS, help="comma-separated ROWS:DAYS pairs")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per rule")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("/tmp/llmcost-bench"), help="where built data sets are kept"
    )
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine_summary()}; load average {load_average()}")
    shipped = builtin_rules()
    bounded = [with_upper_bound(rule) for rule in shipped]
    failed = False
    for rows, days in parse_datasets(args.datasets):
        path = dataset_path(args.cache_dir, rows, days)
        if not path.exists():
            print(f"building {rows:,} rows over {days:g} days in {path} ...", file=sys.stderr, flush=True)
            seconds = build(path, rows, days)
            print(f"built {path} in {seconds:.0f} s")
        store = Store(f"sqlite:///{path}")
        if rolled_up_through(store) != CLOCK.date() - timedelta(days=1):
            started = time.perf_counter()
            rolled = refresh_rollups(store, clock=lambda: CLOCK)
            print(f"rolled up {rolled} days of {path.name} in {time.perf_counter() - started:.0f} s (once)")
        counts = window_counts(store)
        with store.read() as conn:
            rollup_rows = conn.exec_driver_sql("SELECT count(*) FROM cost_daily").scalar_one()
        print(f"\n{rows:,} rows over {days:g} days ({path.stat().st_size / 2**30:.2f} GiB), "
              f"{rollup_rows:,} cost_daily rows; rows in the windows: "
              + ", ".join(f"{name} {count:,}" for name, count in counts.items()))

        as_shipped = time_rules(store, shipped, args.repeat)
        if any(new.sql.text != old.sql.text for new, old in zip(bounded, shipped, strict=True)):
            proposed = time_rules(store, bounded, args.repeat)
        else:
            # The shipped rules close their windows already.
            proposed = as_shipped
        naive = time_without_indexes(store, shipped)
        watcher_ms = time_watcher(store, max(3, args.repeat // 3))
        print(f"  {'rule':<42}{'shipped ms':>12}{'ts <= :now ms':>15}{'no index ms':>13}{'ratio':>8}")
        for name, milliseconds in as_shipped.items():
            if name in naive:
                print(f"  {name:<42}{milliseconds:>12.2f}{proposed[name]:>15.2f}{naive[name]:>13.1f}"
                      f"{naive[name] / milliseconds:>8.1f}")
            else:
                print(f"  {name:<42}{milliseconds:>12.2f}{proposed[name]:>15.2f}")
        print(f"  watcher pass, dry run, rules as shipped: {watcher_ms:.2f} ms")
        for label, rules in (("shipped", shipped), ("ts <= :now", bounded)):
            for name, plan in query_plans(store, rules).items():
                unbounded = unbounded_steps(plan)
                verdict = "NO ts RANGE" if unbounded else "ts range"
                print(f"  plan {label} {name}: {verdict}: {' | '.join(plan)}")
        if rows >= 10_000_000 and as_shipped["all rules"] > TARGET_MS:
            took = as_shipped["all rules"]
            print(f"  MISSED: all rules took {took:.1f} ms, above the {TARGET_MS:.0f} ms target")
            failed = True
        store.dispose()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
