"""`llmcost exporter`: metrics computed from the store, read incrementally."""

from __future__ import annotations

import signal
import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmcost_mw.events import CostEvent, Status, utcnow
from llmcost_mw.exporter import StoreCollector
from llmcost_mw.store import Store, cost_events
from llmcost_mw.usage import Usage
from servers import (
    EXPORTER_SECTION,
    IN_PROCESS_SECTION,
    documented_metrics,
    free_port,
    require_binary,
    sample_sum,
    scrape,
    scraped_metrics,
    wait_for_http,
)

NOW = datetime(2026, 3, 14, 15, 30)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _row(
    ts: datetime = NOW, feature: str | None = "summarize", cost: str | None = "0.25", **overrides
) -> dict:
    fields = dict(
        provider="anthropic",
        model="claude-sonnet-4-6",
        usage=Usage(
            input_tokens=10, cache_write_5m_tokens=4, cache_write_1h_tokens=2, cache_read_tokens=3,
            output_tokens=5,
        ),
        feature=feature,
        user_id="u-1",
        ts=ts,
        cost_usd=Decimal(cost) if cost is not None else None,
        unpriced=cost is None,
    )
    fields.update(overrides)
    return CostEvent(**fields).to_row()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def exporter(store, clock):
    """Return a function that scrapes a StoreCollector on `store` and returns the exposition text."""
    store.ensure_schema()
    collector = StoreCollector(store, clock=clock)
    registry = CollectorRegistry()
    registry.register(collector)

    def scrape_collector() -> str:
        return generate_latest(registry).decode()

    scrape_collector.collector = collector
    return scrape_collector


def _sql_total_cost(store) -> float:
    with store.read() as conn:
        return float(conn.execute(sa.select(sa.func.sum(cost_events.c.cost_usd))).scalar() or 0)


def test_scrape_matches_docs_table(store, exporter):
    store.insert_events([_row(), _row(cost=None, model="claude-unlisted"), _row(status=Status.ERROR)])

    assert scraped_metrics(exporter()) == documented_metrics(EXPORTER_SECTION)


def test_names_disjoint_from_in_process():
    assert not set(documented_metrics(EXPORTER_SECTION)) & set(documented_metrics(IN_PROCESS_SECTION))


def test_totals_match_sql(store, exporter):
    store.insert_events([_row(feature=f"f{i % 3}", cost=f"0.0{i % 7 + 1}") for i in range(40)])
    text = exporter()

    assert sample_sum(text, "llmcost_store_cost_usd_total") == pytest.approx(_sql_total_cost(store), abs=1e-9)
    assert sample_sum(text, "llmcost_store_calls_total") == 40
    assert sample_sum(text, "llmcost_store_tokens_total", token_type="input") == 400
    assert sample_sum(text, "llmcost_store_tokens_total", token_type="cache_write") == 240
    assert sample_sum(text, "llmcost_store_tokens_total", token_type="cache_read") == 120
    assert sample_sum(text, "llmcost_store_tokens_total", token_type="output") == 200
    assert sample_sum(text, "llmcost_store_last_event_id") == 40
    assert sample_sum(text, "llmcost_store_up") == 1


def test_new_rows_added_to_totals(store, exporter):
    store.insert_events([_row() for _ in range(5)])
    exporter()
    store.insert_events([_row(feature="chat", cost="1.5"), _row(cost=None, model="claude-unlisted")])
    text = exporter()

    assert sample_sum(text, "llmcost_store_cost_usd_total", feature="summarize") == pytest.approx(1.25)
    assert sample_sum(text, "llmcost_store_cost_usd_total", feature="chat") == pytest.approx(1.5)
    assert sample_sum(text, "llmcost_store_calls_total") == 7
    assert sample_sum(text, "llmcost_store_unpriced_calls_total", model="claude-unlisted") == 1
    assert sample_sum(text, "llmcost_store_last_event_id") == 7


def test_scrape_reads_only_new_rows(store, exporter):
    """Rows already read are not read again, so deleting them behind the exporter's back changes nothing."""
    store.insert_events([_row() for _ in range(5)])
    exporter()
    with store.write() as conn:
        conn.execute(sa.delete(cost_events).where(cost_events.c.id < 5))
    store.insert_events([_row(feature="chat")])
    text = exporter()

    assert sample_sum(text, "llmcost_store_calls_total", feature="summarize") == 5
    assert sample_sum(text, "llmcost_store_calls_total", feature="chat") == 1


def test_emptied_table_keeps_totals(store, exporter):
    store.insert_events([_row() for _ in range(5)])
    exporter()
    with store.write() as conn:
        conn.execute(sa.delete(cost_events))
    assert sample_sum(exporter(), "llmcost_store_calls_total") == 5

    store.insert_events([_row(feature="chat")])
    text = exporter()

    assert sample_sum(text, "llmcost_store_calls_total", feature="summarize") == 5
    assert sample_sum(text, "llmcost_store_calls_total", feature="chat") == 1


def test_reused_ids_reload_totals(store, exporter, caplog):
    store.insert_events([_row() for _ in range(5)])
    exporter()
    with store.write() as conn:
        conn.execute(sa.delete(cost_events))
        # As if the table had been recreated: SQLite hands out ids from 1 again.
        conn.exec_driver_sql("DELETE FROM sqlite_sequence WHERE name = 'cost_events'")
    store.insert_events([_row(feature="chat")])
    text = exporter()

    assert sample_sum(text, "llmcost_store_calls_total", feature="summarize") == 0
    assert sample_sum(text, "llmcost_store_calls_total", feature="chat") == 1
    assert "went down from 5 to 1" in caplog.text


def test_bulk_load_equals_row_by_row(store, clock):
    rows = [
        _row(feature=f"f{i % 4}", ts=NOW - timedelta(minutes=37 * i), status="error" if i % 5 == 0 else "ok")
        for i in range(60)
    ]
    rows += [_row(cost=None, model="claude-unlisted") for _ in range(3)]
    store.insert_events(rows)

    def samples(bulk_threshold_rows: int) -> dict[tuple, float]:
        registry = CollectorRegistry()
        registry.register(StoreCollector(store, clock=clock, bulk_threshold_rows=bulk_threshold_rows))
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            if family.name != "llmcost_store_read_duration_seconds"
            for sample in family.samples
        }

    by_rows = samples(bulk_threshold_rows=1_000)
    in_bulk = samples(bulk_threshold_rows=5)

    # The database and Python add the costs in different orders.
    assert in_bulk == pytest.approx(by_rows, abs=1e-9)
    assert sum(value for (name, labels), value in in_bulk.items()
               if name == "llmcost_store_calls_total" and ("status", "error") in labels) == 12


def test_hour_and_day_windows(store, exporter, clock):
    store.insert_events([
        _row(ts=datetime(2026, 3, 13, 23, 59), cost="1"),   # yesterday
        _row(ts=datetime(2026, 3, 14, 0, 0), cost="2"),     # today, first second
        _row(ts=datetime(2026, 3, 14, 14, 59), cost="4"),   # today, previous hour
        _row(ts=datetime(2026, 3, 14, 15, 0), cost="8"),    # current hour
        _row(ts=datetime(2026, 3, 14, 15, 29), cost="16"),  # current hour
    ])
    text = exporter()
    assert sample_sum(text, "llmcost_store_current_hour_cost_usd") == 24
    assert sample_sum(text, "llmcost_store_current_day_cost_usd") == 30

    clock.now = datetime(2026, 3, 14, 16, 5)
    store.insert_events([_row(ts=datetime(2026, 3, 14, 16, 1), cost="32")])
    text = exporter()
    assert sample_sum(text, "llmcost_store_current_hour_cost_usd") == 32
    assert sample_sum(text, "llmcost_store_current_day_cost_usd") == 62

    clock.now = datetime(2026, 3, 15, 0, 0, 1)
    text = exporter()
    assert sample_sum(text, "llmcost_store_current_hour_cost_usd") == 0
    assert sample_sum(text, "llmcost_store_current_day_cost_usd") == 0
    assert sample_sum(text, "llmcost_store_cost_usd_total") == 63


def test_late_row_in_past_hour_skips_window(store, exporter):
    exporter()
    store.insert_events([_row(ts=NOW - timedelta(hours=2), cost="5")])
    text = exporter()

    assert sample_sum(text, "llmcost_store_current_hour_cost_usd") == 0
    assert sample_sum(text, "llmcost_store_current_day_cost_usd") == 5
    assert sample_sum(text, "llmcost_store_cost_usd_total") == 5


def _insert_with_id(store, row_id: int, **row_fields) -> None:
    store.ensure_schema()
    with store.write() as conn:
        conn.execute(sa.insert(cost_events).values(id=row_id, **_row(**row_fields)))


def test_row_committed_late_is_counted(store, exporter):
    """A lower id that appears after a higher one was read still counts, as with out-of-order commits."""
    for row_id in (1, 2, 4):
        _insert_with_id(store, row_id)
    text = exporter()
    assert sample_sum(text, "llmcost_store_calls_total") == 3

    _insert_with_id(store, 3, feature="chat")
    text = exporter()
    assert sample_sum(text, "llmcost_store_calls_total") == 4
    assert sample_sum(text, "llmcost_store_calls_total", feature="chat") == 1

    # Counted once, not on every later scrape.
    assert sample_sum(exporter(), "llmcost_store_calls_total") == 4


def test_missing_id_expires(store, clock):
    collector = StoreCollector(store, clock=clock, gap_grace_seconds=0)
    for row_id in (1, 3):
        _insert_with_id(store, row_id)
    collector.refresh()
    _insert_with_id(store, 2, feature="chat")
    collector.refresh()
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()

    assert sample_sum(text, "llmcost_store_calls_total") == 2
    assert sample_sum(text, "llmcost_store_calls_total", feature="chat") == 0


def test_unreadable_store_serves_last_totals(store, exporter, monkeypatch, caplog):
    store.insert_events([_row() for _ in range(3)])
    exporter()

    def fail() -> None:
        raise sa.exc.OperationalError("SELECT max(id)", {}, Exception("disk I/O error"))

    monkeypatch.setattr(store, "read", fail)
    text = exporter()

    assert sample_sum(text, "llmcost_store_up") == 0
    assert sample_sum(text, "llmcost_store_calls_total") == 3
    assert "reading the store" in caplog.text


def test_failed_read_counts_rows_once(store, exporter, monkeypatch):
    store.insert_events([_row() for _ in range(3)])
    exporter()
    store.insert_events([_row(feature="chat") for _ in range(2)])
    collector = exporter.collector
    look_up_gaps = collector._look_up_gaps

    def fail_after_rows_were_added(*args):
        raise sa.exc.OperationalError("SELECT id", {}, Exception("database is locked"))

    monkeypatch.setattr(collector, "_look_up_gaps", fail_after_rows_were_added)
    failed = exporter()
    monkeypatch.setattr(collector, "_look_up_gaps", look_up_gaps)
    recovered = exporter()

    assert sample_sum(failed, "llmcost_store_up") == 0
    assert sample_sum(failed, "llmcost_store_calls_total") == 3
    assert sample_sum(recovered, "llmcost_store_up") == 1
    assert sample_sum(recovered, "llmcost_store_calls_total", feature="chat") == 2
    assert sample_sum(recovered, "llmcost_store_calls_total") == 5


def test_feature_label_bounded(store, clock):
    store.insert_events([_row(feature=f"page-{i}") for i in range(6)])
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, clock=clock, max_features=4))
    text = generate_latest(registry).decode()

    assert sample_sum(text, "llmcost_store_calls_total", feature="other") == 2
    assert sample_sum(text, "llmcost_store_calls_total") == 6


def test_promtool_accepts_scrape(store, exporter):
    promtool = require_binary("promtool")
    store.insert_events([_row(), _row(cost=None, model="claude-unlisted"), _row(status=Status.ERROR)])

    result = subprocess.run(
        [promtool, "check", "metrics"], input=exporter(), capture_output=True, text=True, timeout=30
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


def _listening_addresses(port: int) -> set[str]:
    """Return the local IPv4 addresses with a socket listening on `port`, from /proc/net/tcp."""
    addresses = set()
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            address_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                addresses.add(".".join(str(int(address_hex[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return addresses


def test_cli_serves_store_on_loopback(store, db_path):
    store.insert_events([_row(ts=utcnow()) for _ in range(4)])
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llmcost_mw.cli", "exporter", "--database-url", f"sqlite:///{db_path}",
         "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/metrics", process)
        text = scrape(f"http://127.0.0.1:{port}/metrics")
        assert _listening_addresses(port) == {"127.0.0.1"}

        store.insert_events([_row(ts=utcnow(), feature="chat")])
        text = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)

    assert sample_sum(text, "llmcost_store_calls_total") == 5
    assert sample_sum(text, "llmcost_store_current_day_cost_usd") == pytest.approx(1.25)
    assert process.returncode == 0, output
    assert "exporter stopped" in output


def test_cli_rejects_bad_port(db_path):
    result = subprocess.run(
        [sys.executable, "-m", "llmcost_mw.cli", "exporter", "--database-url", f"sqlite:///{db_path}",
         "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "invalid port 70000" in result.stderr


def _totals(store, clock) -> dict[tuple, float]:
    """Scrape a new collector, as after an exporter restart, and return its counter samples."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, clock=clock))
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.type == "counter"
        for sample in family.samples
    }


def test_restart_after_prune_keeps_totals(store, clock):
    """Rows deleted by `llmcost prune` still count, from the daily totals, so counters never go down."""
    from llmcost_mw.retention import prune, refresh_rollups

    rows = [_row(ts=NOW - timedelta(days=day, minutes=n), feature=f"f{n % 2}", cost=f"0.{day + 1}")
            for day in range(10) for n in range(3)]
    rows += [_row(ts=NOW - timedelta(days=8), cost=None, model="claude-unlisted"),
             _row(ts=NOW - timedelta(days=7), status=Status.ERROR)]
    store.insert_events(rows)
    before = _totals(store, clock)

    result = prune(store, older_than_days=3, clock=clock)
    assert result.rows_deleted > 0
    assert _totals(store, clock) == pytest.approx(before, abs=1e-9)

    # A late row for a pruned day counts once, before and after the next roll-up.
    store.insert_events([_row(ts=NOW - timedelta(days=9), feature="late", cost="2")])
    late = _totals(store, clock)
    assert late[("llmcost_store_calls_total", (("feature", "late"), ("model", "claude-sonnet-4-6"),
                                                ("provider", "anthropic"), ("status", "ok")))] == 1
    refresh_rollups(store, clock=clock)
    assert _totals(store, clock) == pytest.approx(late, abs=1e-9)


def test_backends_match_sql(backend_url, clock):
    store = Store(backend_url)
    try:
        store.insert_events([
            _row(ts=NOW - timedelta(days=1), cost="1"),
            _row(ts=NOW - timedelta(hours=2), feature="chat", cost="2"),
            _row(ts=NOW - timedelta(minutes=5), cost="4"),
            _row(ts=NOW - timedelta(minutes=1), cost=None, model="claude-unlisted"),
        ])
        registry = CollectorRegistry()
        registry.register(StoreCollector(store, clock=clock, bulk_threshold_rows=2))
        text = generate_latest(registry).decode()

        assert sample_sum(text, "llmcost_store_cost_usd_total") == pytest.approx(_sql_total_cost(store))
        assert sample_sum(text, "llmcost_store_calls_total") == 4
        assert sample_sum(text, "llmcost_store_tokens_total", token_type="cache_write") == 24
        assert sample_sum(text, "llmcost_store_unpriced_calls_total") == 1
        assert sample_sum(text, "llmcost_store_current_hour_cost_usd") == 4
        assert sample_sum(text, "llmcost_store_current_day_cost_usd") == 6
    finally:
        store.dispose()


def test_postgres_out_of_order_commit(postgres_server, clock):
    """An id taken by a transaction that commits after a higher id was read is counted once it commits."""
    store = Store(postgres_server.create_database())
    try:
        store.insert_events([_row()])
        registry = CollectorRegistry()
        registry.register(StoreCollector(store, clock=clock))
        generate_latest(registry)

        with store.engine.connect() as slow:
            slow_transaction = slow.begin()
            slow.execute(sa.insert(cost_events).values(**_row(feature="slow")))
            store.insert_events([_row(feature="fast")])
            before_commit = generate_latest(registry).decode()
            slow_transaction.commit()
        after_commit = generate_latest(registry).decode()

        assert sample_sum(before_commit, "llmcost_store_calls_total", feature="fast") == 1
        assert sample_sum(before_commit, "llmcost_store_calls_total", feature="slow") == 0
        assert sample_sum(after_commit, "llmcost_store_calls_total", feature="slow") == 1
        assert sample_sum(after_commit, "llmcost_store_calls_total") == 3
    finally:
        store.dispose()
