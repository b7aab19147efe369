"""The watcher against a SQLite file and the local ntfy receiver, with an injected clock."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from llmcost_mw.alerts import NtfyNotifier, Rule, Watcher, builtin_rules
from llmcost_mw.demo.ntfy_receiver import NtfyReceiver
from llmcost_mw.events import CostEvent
from llmcost_mw.store import Store, alert_outbox, alert_state
from llmcost_mw.usage import Usage

START = datetime(2025, 3, 10, 9, 0)
TOPIC = "cost-alerts-7Qx2"
TOKEN = "tk_watchertesttoken"


class Clock:
    """A settable clock that returns naive UTC datetimes."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def cost_row(ts, cost, *, user="alice", feature="chat", model="claude-sonnet-4-5", unpriced=False):
    event = CostEvent(
        provider="anthropic",
        model=model,
        usage=Usage(input_tokens=100, output_tokens=20),
        ts=ts,
        cost_usd=None if cost is None else Decimal(cost),
        user_id=user,
        feature=feature,
        unpriced=unpriced,
    )
    return event.to_row()


def rules_named(*names):
    return [rule for rule in builtin_rules() if rule.name in names]


@pytest.fixture
def store(backend_url):
    """The store of each test, on SQLite and on PostgreSQL."""
    store = Store(backend_url)
    yield store
    store.dispose()


@pytest.fixture
def clock():
    return Clock(START)


@pytest.fixture
def receiver():
    with NtfyReceiver(hang_seconds=10) as server:
        yield server


@pytest.fixture
def notifier(receiver):
    with NtfyNotifier(receiver.topic_url(TOPIC), token=TOKEN, timeout_seconds=0.5) as client:
        yield client


def make_watcher(store, notifier, clock, *names, **options):
    return Watcher(store, rules_named(*names) if names else builtin_rules(), notifier, clock=clock, **options)


def outbox_rows(store):
    with store.read() as conn:
        return [
            dict(row._mapping) for row in conn.execute(sa.select(alert_outbox).order_by(alert_outbox.c.id))
        ]


# Per built-in rule: a function that adds rows putting a first entity over the
# limit, the same for a second entity, and the alert value of each.
CASES = {
    "user_hourly_spend": (
        lambda now: [cost_row(now, "6.00", user="alice")],
        lambda now: [cost_row(now, "7.00", user="bob")],
        (6.0, 7.0),
    ),
    "feature_daily_spend": (
        lambda now: [cost_row(now, "60.00", feature="search")],
        lambda now: [cost_row(now, "70.00", feature="summarize")],
        (60.0, 70.0),
    ),
    "request_cost": (
        lambda now: [cost_row(now, "0.82")],
        lambda now: [cost_row(now, "0.90")],
        (0.82, 0.90),
    ),
    "unpriced_model": (
        lambda now: [cost_row(now, None, model="mystery-1", unpriced=True)],
        lambda now: [
            dict(cost_row(now, None, model="mystery-2", unpriced=True), event_id=f"m2-{i}") for i in "ab"
        ],
        (1, 2),
    ),
}


@pytest.mark.parametrize("rule_name", list(CASES))
def test_rule_pages_once_per_entity_in_cooldown(store, notifier, receiver, clock, rule_name):
    first_rows, second_rows, (first_value, second_value) = CASES[rule_name]
    watcher = make_watcher(store, notifier, clock, rule_name)
    store.insert_events(first_rows(clock.now))

    first = watcher.run_once()
    clock.advance(minutes=10)
    store.insert_events(second_rows(clock.now))
    second = watcher.run_once()
    clock.advance(minutes=10)
    third = watcher.run_once()

    assert [(alert.rule, alert.value) for alert in first] == [(rule_name, pytest.approx(first_value))]
    assert [(alert.rule, alert.value) for alert in second] == [(rule_name, pytest.approx(second_value))]
    assert third == []
    assert all(alert.delivered for alert in first + second)
    assert [message.title for message in receiver.messages] == [first[0].title, second[0].title]


@pytest.mark.parametrize("rule_name", list(CASES))
def test_restarted_watcher_does_not_page_again(store, notifier, receiver, clock, rule_name):
    first_rows, _second_rows, _values = CASES[rule_name]
    store.insert_events(first_rows(clock.now))
    make_watcher(store, notifier, clock, rule_name).run_once()
    clock.advance(minutes=5)

    again = make_watcher(store, notifier, clock, rule_name).run_once()

    assert again == []
    assert len(receiver.messages) == 1


def test_user_pages_again_after_cooldown(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend")
    store.insert_events([cost_row(clock.now, "6.00")])
    watcher.run_once()

    clock.advance(minutes=59)
    store.insert_events([cost_row(clock.now, "6.00")])
    inside = watcher.run_once()
    clock.advance(minutes=1)
    after = watcher.run_once()

    assert inside == []
    assert [alert.entity for alert in after] == ["alice"]
    assert len(receiver.messages) == 2


def test_user_alert_counts_last_hour_only(store, notifier, receiver):
    clock = Clock(datetime(2025, 3, 10, 3, 0))
    store.insert_events(
        [
            cost_row(datetime(2025, 3, 10, 0, 10), "4.00"),
            cost_row(datetime(2025, 3, 10, 0, 40), "4.00"),
            cost_row(datetime(2025, 3, 10, 2, 30), "6.00"),
        ]
    )

    alerts = make_watcher(store, notifier, clock, "user_hourly_spend").run_once()

    assert len(alerts) == 1
    assert alerts[0].value == pytest.approx(6.0)
    assert "over 1 calls" in receiver.messages[0].message
    assert "$6.00" in receiver.messages[0].title


def test_feature_pages_once_per_utc_day(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "feature_daily_spend")
    store.insert_events([cost_row(clock.now, "60.00")])
    first = watcher.run_once()

    clock.now = datetime(2025, 3, 10, 23, 59)
    store.insert_events([cost_row(clock.now, "60.00")])
    same_day = watcher.run_once()

    clock.now = datetime(2025, 3, 11, 0, 1)
    quiet_new_day = watcher.run_once()
    store.insert_events([cost_row(clock.now, "55.00")])
    next_day = watcher.run_once()

    assert len(first) == 1
    assert same_day == []
    assert quiet_new_day == []
    assert [alert.value for alert in next_day] == [pytest.approx(55.0)]
    assert len(receiver.messages) == 2


def test_steady_feature_spend_never_pages(store, notifier, receiver, clock):
    clock.now = datetime(2025, 3, 1, 0, 0)
    watcher = make_watcher(store, notifier, clock, "feature_daily_spend")
    alerts = []

    # $1.25 an hour is $30 a day; a pass runs every 6 hours for 10 days.
    for hour in range(24 * 10):
        store.insert_events([cost_row(clock.now + timedelta(minutes=30), "1.25")])
        clock.advance(hours=1)
        if hour % 6 == 5:
            alerts.extend(watcher.run_once())

    assert alerts == []
    assert receiver.request_count == 0


def test_expensive_request_pages_exactly_once(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "request_cost")
    store.insert_events([cost_row(clock.now, "0.82")])

    raised = []
    for _ in range(8):
        raised.extend(watcher.run_once())
        clock.advance(minutes=10)

    assert len(raised) == 1
    assert len(receiver.messages) == 1
    assert "$0.82" in receiver.messages[0].title


def test_expensive_requests_in_one_pass_page_once(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "request_cost")
    store.insert_events(
        [
            cost_row(clock.now, "0.60", user="alice"),
            cost_row(clock.now, "2.10", user="bob", model="claude-opus-4-1"),
            cost_row(clock.now, "0.70", user="carol"),
        ]
    )

    alerts = watcher.run_once()
    clock.advance(minutes=1)
    store.insert_events([cost_row(clock.now, "0.55", user="dave")])
    later = watcher.run_once()

    assert len(alerts) == 1
    assert (alerts[0].count, alerts[0].value) == (3, pytest.approx(2.10))
    message = receiver.messages[0].message
    assert "New requests over $0.50 in the last 60 minutes: 3." in message
    assert "$2.10: model claude-opus-4-1, feature chat, user bob" in message
    assert [(alert.count, alert.row["user_id"]) for alert in later] == [(1, "dave")]


def test_request_state_is_pruned_after_lookback(store, notifier, clock):
    watcher = make_watcher(store, notifier, clock, "request_cost")
    store.insert_events([cost_row(clock.now, "0.82")])
    watcher.run_once()

    clock.advance(hours=2, minutes=1)
    store.insert_events([cost_row(clock.now, "0.90")])
    watcher.run_once()

    with store.read() as conn:
        entities = conn.execute(
            sa.select(alert_state.c.entity).where(alert_state.c.rule == "request_cost")
        ).scalars()
        assert sorted(entities) == ["*", "2"]


@pytest.mark.parametrize("mode", ["throttle", "fail"])
def test_alert_delivered_once_after_server_recovers(store, notifier, receiver, clock, mode):
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend")
    store.insert_events([cost_row(clock.now, "6.00")])
    receiver.set_mode(mode)

    raised = watcher.run_once()
    receiver.set_mode("ok")
    clock.advance(seconds=10)
    before_backoff = watcher.run_once()
    clock.advance(seconds=25)
    recovered = watcher.run_once()
    for _ in range(3):
        clock.advance(minutes=5)
        watcher.run_once()

    assert [alert.delivered for alert in raised] == [False]
    assert before_backoff == []
    assert recovered == []
    assert receiver.request_count == 2
    assert len(receiver.messages) == 1
    [row] = outbox_rows(store)
    assert row["attempts"] == 2
    assert row["delivered_at"] == START + timedelta(seconds=35)
    assert row["last_error"] is None


def test_backoff_doubles_while_server_fails(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend", retry_base_seconds=30)
    store.insert_events([cost_row(clock.now, "6.00")])
    receiver.set_mode("fail")

    retry_times = []
    for _ in range(4):
        watcher.run_once()
        [row] = outbox_rows(store)
        retry_times.append(row["next_attempt_at"] - clock.now)
        clock.now = row["next_attempt_at"]

    assert retry_times == [timedelta(seconds=s) for s in (30, 60, 120, 240)]


def test_restart_delivers_pending_alert_once(store, notifier, receiver, clock):
    store.insert_events([cost_row(clock.now, "6.00")])
    receiver.set_mode("throttle")
    make_watcher(store, notifier, clock, "user_hourly_spend").run_once()

    receiver.set_mode("ok")
    clock.advance(minutes=1)
    raised = make_watcher(store, notifier, clock, "user_hourly_spend").run_once()

    assert raised == []
    assert len(receiver.messages) == 1


def test_hanging_server_does_not_block_other_alerts(store, notifier, receiver, clock, caplog):
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend")
    store.insert_events([cost_row(clock.now, "6.00", user=user) for user in ("alice", "bob", "carol")])
    receiver.set_mode("hang", requests=1)

    with caplog.at_level(logging.INFO, logger="llmcost_mw.alerts"):
        alerts = watcher.run_once()

    assert [(alert.entity, alert.delivered) for alert in alerts] == [
        ("alice", False),
        ("bob", True),
        ("carol", True),
    ]
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 1
    assert (
        "rule user_hourly_spend, entity alice, attempt 1: ntfy request timed out after 0.5 s" in failures[0]
    )

    clock.advance(seconds=30)
    watcher.run_once()
    assert sorted(message.title.split()[1] for message in receiver.messages) == ["alice", "bob", "carol"]


def test_delivery_stops_after_repeated_timeouts(store, notifier, receiver, clock):
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend")
    users = [f"user{i}" for i in range(5)]
    store.insert_events([cost_row(clock.now, "6.00", user=user) for user in users])
    receiver.set_mode("hang")

    watcher.run_once()

    assert receiver.request_count == 3
    assert [row["attempts"] for row in outbox_rows(store)] == [1, 1, 1, 0, 0]


def test_broken_rule_does_not_stop_others(store, notifier, receiver, clock, caplog):
    broken = Rule(
        name="broken",
        sql="SELECT missing_column AS entity FROM cost_events WHERE ts >= :since",
        title="{entity}",
        message="{entity}",
    )
    watcher = Watcher(store, [broken, *rules_named("user_hourly_spend")], notifier, clock=clock)
    store.insert_events([cost_row(clock.now, "6.00")])

    with caplog.at_level(logging.ERROR, logger="llmcost_mw.alerts"):
        alerts = watcher.run_once()

    assert [alert.rule for alert in alerts] == ["user_hourly_spend"]
    assert any("alert rule broken failed" in record.getMessage() for record in caplog.records)


# A query that would run for hours: it counts to 10^12 one row at a time.
RUNAWAY_SQL = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000000000) "
    "SELECT 'loop' AS entity, COUNT(*) AS value FROM n WHERE :now IS NOT NULL"
)


@pytest.mark.timeout(60)
def test_runaway_rule_stopped_at_timeout(store, notifier, receiver, clock, caplog):
    runaway = Rule(name="runaway", sql=RUNAWAY_SQL, title="{entity}", message="{entity}", timeout_seconds=0.5)
    watcher = Watcher(store, [runaway, *rules_named("user_hourly_spend")], notifier, clock=clock)
    store.insert_events([cost_row(clock.now, "6.00")])

    with caplog.at_level(logging.ERROR, logger="llmcost_mw.alerts"):
        alerts = watcher.run_once()
        again = watcher.run_once()

    assert [alert.rule for alert in alerts] == ["user_hourly_spend"]
    assert again == []
    stopped = [record.getMessage() for record in caplog.records if "runaway" in record.getMessage()]
    assert len(stopped) == 2
    assert "ran longer than its timeout_seconds of 0.5 s" in stopped[0]


def test_fast_rule_keeps_store_usable_after_timeout(store, notifier, receiver, clock):
    runaway = Rule(name="runaway", sql=RUNAWAY_SQL, title="{entity}", message="{entity}", timeout_seconds=0.2)
    watcher = Watcher(store, [runaway], notifier, clock=clock)
    watcher.run_once()
    store.insert_events([cost_row(clock.now, "6.00")])

    alerts = make_watcher(store, notifier, clock, "user_hourly_spend").run_once()

    assert [alert.entity for alert in alerts] == ["alice"]


def test_locked_database_skips_one_pass(db_path, notifier, receiver, clock, caplog):
    store = Store(f"sqlite:///{db_path}", busy_timeout_ms=100)
    store.insert_events([cost_row(clock.now, "6.00")])
    watcher = make_watcher(store, notifier, clock, "user_hourly_spend")
    blocker = sqlite3.connect(db_path, isolation_level=None)

    try:
        blocker.execute("BEGIN IMMEDIATE")
        with caplog.at_level(logging.ERROR, logger="llmcost_mw.alerts"):
            locked = watcher.run_once()
        blocker.execute("ROLLBACK")
        clock.advance(minutes=1)
        unlocked = watcher.run_once()
    finally:
        blocker.close()
        store.dispose()

    assert locked == []
    assert any("database is locked" in record.getMessage() for record in caplog.records)
    assert [alert.entity for alert in unlocked] == ["alice"]
    assert len(receiver.messages) == 1


def test_dry_run_writes_and_sends_nothing(store, receiver, clock):
    watcher = Watcher(store, builtin_rules(), None, clock=clock, dry_run=True)
    store.insert_events([cost_row(clock.now, "6.00")])

    first = watcher.run_once()
    second = watcher.run_once()

    assert [alert.rule for alert in first] == ["user_hourly_spend", "request_cost"]
    assert [alert.rule for alert in second] == ["user_hourly_spend", "request_cost"]
    assert outbox_rows(store) == []
    assert receiver.request_count == 0


def test_run_forever_stops_within_a_second(store, notifier, receiver):
    watcher = Watcher(store, builtin_rules(), notifier, interval_seconds=60)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,))
    thread.start()

    time.sleep(0.3)
    stopped_at = time.monotonic()
    stop.set()
    thread.join(timeout=2)

    assert not thread.is_alive()
    assert time.monotonic() - stopped_at < 1.0


def test_logs_never_contain_topic_or_token(store, notifier, receiver, clock, caplog):
    watcher = make_watcher(store, notifier, clock)
    store.insert_events([cost_row(clock.now, "6.00", user=user) for user in ("alice", "bob")])
    receiver.set_mode("throttle", requests=1)

    with caplog.at_level(logging.DEBUG):
        watcher.run_once()
        receiver.set_mode("hang", requests=1)
        clock.advance(minutes=5)
        store.insert_events([cost_row(clock.now, "6.00", user="carol")])
        watcher.run_once()

    levels = {record.levelname for record in caplog.records}
    assert {"INFO", "WARNING"} <= levels
    assert "alert watcher started: rules user_hourly_spend, feature_daily_spend" in caplog.text
    assert store.safe_url in caplog.text
    assert TOPIC not in caplog.text
    assert TOKEN not in caplog.text
    # urllib3 logs the server host and path at DEBUG; the path is "/", without the topic.
    ours = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("llmcost_mw"))
    assert receiver.url.rstrip("/") not in ours


def test_duplicate_rule_names_rejected(store, notifier):
    with pytest.raises(ValueError, match="duplicate alert rule names: request_cost"):
        Watcher(store, builtin_rules() + rules_named("request_cost"), notifier)
