"""The watcher: runs the alert rules against the store and delivers new alerts through a notifier.

Each pass (`Watcher.run_once`) does two things:

1. For every rule, it runs the rule's query and decides which rows fire,
   with the cooldown and day window kept per (rule, entity) in `alert_state`.
   A new alert is written to `alert_outbox` in the same transaction that
   updates `alert_state`, so a watcher that restarts neither pages again
   nor loses an alert.
2. It delivers the pending rows of `alert_outbox`. A row counts as sent only
   when the notifier returns, which means that the server accepted it. A
   failed row is retried on later passes, with exponential backoff, until it
   is delivered.

`run_forever(stop_event)` repeats passes every `interval_seconds` until the
event is set. The command line sets the event on SIGTERM and Ctrl-C.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from ..errors import ConfigurationError, LLMCostError, RuleTimeoutError
from ..events import utcnow
from ..retention import refresh_rollups
from ..store import Store, alert_outbox, alert_state
from .rules import Rule

__all__ = ["Alert", "DeliveryError", "Notification", "Notifier", "Watcher"]

logger = logging.getLogger(__name__)

# The alert_state entity that stores when a `combine_rows` rule last sent a
# notification. Such rules key their other state rows by row id, never "*".
RULE_ENTITY = "*"

# Outbox rows sent per pass at most, so that a long backlog still leaves time for the rules.
DELIVERY_BATCH = 50

# After this many timeouts or connection errors in a row, a pass stops
# delivering: the server is likely down, and every further attempt would
# wait for the full timeout.
MAX_CONSECUTIVE_TRANSPORT_FAILURES = 3

# Entities per `IN (...)` list, well below the bind limits of SQLite and PostgreSQL.
_STATE_CHUNK = 500


@dataclass(frozen=True, slots=True)
class Notification:
    """The rendered alert that a notifier sends."""

    title: str
    message: str
    priority: int = 3
    tags: tuple[str, ...] = ()
    click: str | None = None


class DeliveryError(LLMCostError):
    """A notification was not accepted by the server.

    `retryable` is false for failures that a retry cannot fix, such as a wrong
    token. The watcher then waits the maximum backoff before the next attempt.
    `retry_after_seconds` is the server's Retry-After, if it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        retry_after_seconds: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_seconds = retry_after_seconds
        self.status = status


class Notifier(Protocol):
    """Sends one notification; returns when the server accepted it and raises DeliveryError otherwise."""

    def send(self, notification: Notification) -> Any: ...


@dataclass(slots=True)
class Alert:
    """One notification raised by a rule in a pass.

    `outbox_id` is the `alert_outbox` row (None in a dry run). `delivered` is
    true when the same pass delivered it.
    """

    rule: str
    entity: str
    title: str
    message: str
    priority: int
    tags: tuple[str, ...]
    click: str | None
    value: Any
    count: int
    created_at: datetime
    outbox_id: int | None = None
    delivered: bool = False
    row: dict[str, Any] = field(default_factory=dict, repr=False)


class Watcher:
    """Runs alert rules against a store on a schedule and delivers their alerts.

    `clock` returns the current time as a naive UTC datetime (aware datetimes
    are converted). With `dry_run=True` a pass evaluates the rules and returns
    the alerts it would raise, but sends nothing and writes nothing except the
    schema of a new store.
    """

    def __init__(
        self,
        store: Store,
        rules: Sequence[Rule],
        notifier: Notifier | None,
        *,
        clock: Callable[[], datetime] = utcnow,
        interval_seconds: float = 60,
        dry_run: bool = False,
        retry_base_seconds: float = 30,
        retry_max_seconds: float = 3600,
    ) -> None:
        self.store = store
        self.rules = list(rules)
        self.notifier = notifier
        self.clock = clock
        self.dry_run = dry_run

        names = [rule.name for rule in self.rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigurationError(
                f"duplicate alert rule names: {', '.join(duplicates)}; rename one of each"
            )
        if notifier is None and not dry_run:
            raise ConfigurationError(
                "the watcher needs a notifier (set the ntfy topic URL) unless dry_run is set"
            )
        for option, value in (
            ("interval_seconds", interval_seconds),
            ("retry_base_seconds", retry_base_seconds),
            ("retry_max_seconds", retry_max_seconds),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigurationError(f"invalid {option} {value!r}: use a number of seconds > 0")
        self.interval_seconds = float(interval_seconds)
        self.retry_base_seconds = float(retry_base_seconds)
        self.retry_max_seconds = float(max(retry_max_seconds, retry_base_seconds))
        self._started = False

    # -- passes -------------------------------------------------------------

    def run_once(self, *, stop_event: threading.Event | None = None) -> list[Alert]:
        """Run one pass: evaluate every rule, then deliver pending alerts.

        Returns the alerts raised in this pass. A rule whose query fails is
        logged and skipped; the other rules still run.
        """
        self._log_start()
        stop_event = stop_event or threading.Event()
        try:
            self.store.ensure_schema()
        except sa.exc.SQLAlchemyError as exc:
            logger.error("alert pass skipped: the store at %s is not available: %s", self.store.safe_url, exc)
            return []

        now = self._now()
        try:
            # Baselines read the daily roll-ups; this adds the days that ended since the last pass.
            refresh_rollups(self.store, clock=lambda: now)
        except sa.exc.SQLAlchemyError as exc:
            logger.error("refreshing the daily roll-ups failed; baselines use what is there: %s", exc)
        alerts: list[Alert] = []
        for rule in self.rules:
            if stop_event.is_set():
                break
            try:
                alerts.extend(self._apply_rule(rule, now))
            except sa.exc.SQLAlchemyError as exc:
                logger.error("alert rule %s failed and was skipped in this pass: %s", rule.name, exc)
            except RuleTimeoutError as exc:
                logger.error("%s; the other rules still run", exc)
            except Exception:
                # For example an `entity_thresholds` function that raised: the other rules still run.
                logger.exception(
                    "alert rule %s raised an unexpected error and was skipped in this pass", rule.name
                )

        if self.dry_run:
            for alert in alerts:
                logger.info(
                    "dry run, not sent: rule %s, entity %s: %s", alert.rule, alert.entity, alert.title
                )
            return alerts

        try:
            self._deliver_pending(stop_event, {alert.outbox_id: alert for alert in alerts})
        except sa.exc.SQLAlchemyError as exc:
            logger.error("alert delivery stopped for this pass: the store failed: %s", exc)
        return alerts

    def run_forever(self, stop_event: threading.Event) -> None:
        """Run a pass every `interval_seconds` until `stop_event` is set.

        The wait between passes ends as soon as the event is set. A pass that
        is sending a notification finishes that request first, which takes at
        most the notifier's timeout.
        """
        self._log_start()
        while not stop_event.is_set():
            started = time.monotonic()
            try:
                self.run_once(stop_event=stop_event)
            except Exception:
                # A bug or an unexpected error in one pass must not stop the paging.
                logger.exception("alert pass failed; the next pass runs in %g s", self.interval_seconds)
            elapsed = time.monotonic() - started
            stop_event.wait(max(0.0, self.interval_seconds - elapsed))
        logger.info("alert watcher stopped")

    def pending_count(self) -> int:
        """Return the number of alerts in the outbox that are not delivered yet."""
        self.store.ensure_schema()
        query = (
            sa.select(sa.func.count()).select_from(alert_outbox).where(alert_outbox.c.delivered_at.is_(None))
        )
        with self.store.read() as conn:
            return int(conn.execute(query).scalar_one())

    def _log_start(self) -> None:
        if self._started:
            return
        self._started = True
        logger.info(
            "alert watcher started: rules %s, store %s, interval %g s%s",
            ", ".join(rule.name for rule in self.rules) or "(none)",
            self.store.safe_url,
            self.interval_seconds,
            ", dry run" if self.dry_run else "",
        )

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is not None:
            now = now.astimezone(UTC).replace(tzinfo=None)
        return now

    # -- rules --------------------------------------------------------------

    def _apply_rule(self, rule: Rule, now: datetime) -> list[Alert]:
        with self.store.read() as conn:
            rows = rule.evaluate(conn, now)
        if not rows:
            return []

        if self.dry_run:
            with self.store.read() as conn:
                return self._raise_alerts(conn, rule, rows, now, record=False)
        with self.store.write() as conn:
            return self._raise_alerts(conn, rule, rows, now, record=True)

    def _raise_alerts(
        self, conn: Connection, rule: Rule, rows: list[dict[str, Any]], now: datetime, *, record: bool
    ) -> list[Alert]:
        """Decide which rows fire and, when `record` is set, store their state and outbox rows."""
        if rule.combine_rows:
            return self._raise_combined(conn, rule, rows, now, record=record)

        states = _load_states(conn, rule.name, [row["entity"] for row in rows])
        alerts = []
        for row in rows:
            if not _is_due(rule, states.get(row["entity"]), now):
                continue
            alert = _render(rule, row, count=1, now=now)
            if record:
                _save_state(conn, rule, [row], now)
                alert.outbox_id = _enqueue(conn, alert)
            alerts.append(alert)
        return alerts

    def _raise_combined(
        self, conn: Connection, rule: Rule, rows: list[dict[str, Any]], now: datetime, *, record: bool
    ) -> list[Alert]:
        states = _load_states(conn, rule.name, [row["entity"] for row in rows] + [RULE_ENTITY])
        new_rows = [row for row in rows if row["entity"] not in states and row["entity"] != RULE_ENTITY]
        if not new_rows or not _is_due(rule, states.get(RULE_ENTITY), now):
            return []

        new_rows.sort(key=_costliest_first)
        alert = _render(rule, new_rows[0], count=len(new_rows), now=now)
        if record:
            _save_state(conn, rule, new_rows, now)
            _save_state(conn, rule, [{"entity": RULE_ENTITY, "value": alert.value}], now)
            # A row leaves the query once it is older than the lookback. Its state
            # is kept one more lookback, for rows stamped ahead of our clock.
            horizon = now - timedelta(seconds=2 * rule.lookback_seconds)
            conn.execute(
                sa.delete(alert_state).where(
                    alert_state.c.rule == rule.name,
                    alert_state.c.entity != RULE_ENTITY,
                    alert_state.c.last_fired_at < horizon,
                )
            )
            alert.outbox_id = _enqueue(conn, alert)
        return [alert]

    # -- delivery -----------------------------------------------------------

    def _deliver_pending(self, stop_event: threading.Event, alerts_by_id: Mapping[int | None, Alert]) -> None:
        notifier = self.notifier
        if notifier is None:
            return
        now = self._now()
        query = (
            sa.select(alert_outbox)
            .where(alert_outbox.c.delivered_at.is_(None), alert_outbox.c.next_attempt_at <= now)
            .order_by(alert_outbox.c.id)
            .limit(DELIVERY_BATCH)
        )
        with self.store.read() as conn:
            pending = [dict(row._mapping) for row in conn.execute(query)]

        transport_failures = 0
        for row in pending:
            if stop_event.is_set() or transport_failures >= MAX_CONSECUTIVE_TRANSPORT_FAILURES:
                break
            attempt = row["attempts"] + 1
            if not self._claim(row, attempt):
                continue

            notification = Notification(
                title=row["title"],
                message=row["message"],
                priority=row["priority"],
                tags=tuple(tag for tag in (row["tags"] or "").split(",") if tag),
                click=row["click"],
            )
            try:
                notifier.send(notification)
            except DeliveryError as exc:
                transport_failures = transport_failures + 1 if exc.status is None else 0
                self._record_failure(row, attempt, exc)
            except Exception as exc:
                # A notifier bug must not block the other alerts; the row is retried like a timeout.
                transport_failures = 0
                self._record_failure(
                    row, attempt, DeliveryError(f"notifier raised {type(exc).__name__}: {exc}")
                )
            else:
                transport_failures = 0
                self._record_delivery(row, attempt)
                alert = alerts_by_id.get(row["id"])
                if alert is not None:
                    alert.delivered = True

    def _claim(self, row: Mapping[str, Any], attempt: int) -> bool:
        """Count the attempt and move `next_attempt_at` ahead before sending.

        If the process dies during the request, the row is retried after the
        backoff. Returns False when another watcher claimed the row first.
        """
        retry_at = self._now() + timedelta(seconds=self._backoff_seconds(attempt))
        statement = (
            sa.update(alert_outbox)
            .where(
                alert_outbox.c.id == row["id"],
                alert_outbox.c.attempts == row["attempts"],
                alert_outbox.c.delivered_at.is_(None),
            )
            .values(attempts=attempt, next_attempt_at=retry_at)
        )
        with self.store.write() as conn:
            return conn.execute(statement).rowcount == 1

    def _record_delivery(self, row: Mapping[str, Any], attempt: int) -> None:
        statement = (
            sa.update(alert_outbox)
            .where(alert_outbox.c.id == row["id"])
            .values(delivered_at=self._now(), last_error=None)
        )
        with self.store.write() as conn:
            conn.execute(statement)
        logger.info("alert sent: rule %s, entity %s (attempt %d)", row["rule"], row["entity"], attempt)

    def _record_failure(self, row: Mapping[str, Any], attempt: int, error: DeliveryError) -> None:
        delay = self._backoff_seconds(attempt)
        if not error.retryable:
            delay = self.retry_max_seconds
        elif error.retry_after_seconds is not None:
            delay = min(max(delay, error.retry_after_seconds), self.retry_max_seconds)
        retry_at = self._now() + timedelta(seconds=delay)

        statement = (
            sa.update(alert_outbox)
            .where(alert_outbox.c.id == row["id"])
            .values(next_attempt_at=retry_at, last_error=str(error)[:1000])
        )
        with self.store.write() as conn:
            conn.execute(statement)
        logger.warning(
            "alert delivery failed: rule %s, entity %s, attempt %d: %s; next attempt after %s UTC",
            row["rule"],
            row["entity"],
            attempt,
            error,
            retry_at.isoformat(sep=" ", timespec="seconds"),
        )

    def _backoff_seconds(self, attempt: int) -> float:
        return min(self.retry_base_seconds * 2 ** min(attempt - 1, 30), self.retry_max_seconds)


def _is_due(rule: Rule, state: Mapping[str, Any] | None, now: datetime) -> bool:
    """Tell whether an entity may fire again, given its last state."""
    if state is None:
        return True
    if rule.window == "day" and state["window_key"] == _day_key(now):
        return False
    return now - state["last_fired_at"] >= timedelta(seconds=rule.cooldown_seconds)


def _day_key(now: datetime) -> str:
    return now.date().isoformat()


def _costliest_first(row: Mapping[str, Any]) -> tuple[bool, float, str]:
    value = _as_float(row.get("value"))
    return (value is None, -value if value is not None else 0.0, row["entity"])


def _load_states(conn: Connection, rule: str, entities: Iterable[str]) -> dict[str, dict[str, Any]]:
    states = {}
    for chunk in _chunks(sorted(set(entities)), _STATE_CHUNK):
        query = sa.select(alert_state).where(alert_state.c.rule == rule, alert_state.c.entity.in_(chunk))
        for row in conn.execute(query):
            states[row.entity] = dict(row._mapping)
    return states


def _save_state(conn: Connection, rule: Rule, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    values = [
        {
            "rule": rule.name,
            "entity": row["entity"],
            "last_fired_at": now,
            "window_key": _day_key(now) if rule.window == "day" else None,
            "value": _as_float(row.get("value")),
        }
        for row in rows
    ]
    statement = insert(alert_state)
    statement = statement.on_conflict_do_update(
        index_elements=[alert_state.c.rule, alert_state.c.entity],
        set_={
            "last_fired_at": statement.excluded.last_fired_at,
            "window_key": statement.excluded.window_key,
            "value": statement.excluded.value,
        },
    )
    for chunk in _chunks(values, _STATE_CHUNK):
        conn.execute(statement, chunk)


def _enqueue(conn: Connection, alert: Alert) -> int:
    result = conn.execute(
        sa.insert(alert_outbox).values(
            rule=alert.rule,
            entity=alert.entity,
            created_at=alert.created_at,
            title=alert.title,
            message=alert.message,
            priority=alert.priority,
            tags=",".join(alert.tags) or None,
            click=alert.click,
            attempts=0,
            next_attempt_at=alert.created_at,
        )
    )
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no id for the new alert_outbox row")
    return int(key[0])


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _render(rule: Rule, row: dict[str, Any], *, count: int, now: datetime) -> Alert:
    """Format the rule's templates with one row; fall back to a plain text if a template fails."""
    context = rule.template_context(row, count=count, now=now)
    try:
        title = rule.title.format_map(context)
        message = rule.message.format_map(context)
        click = rule.click.format_map(context) if rule.click else None
    except (KeyError, IndexError, AttributeError, TypeError, ValueError) as exc:
        logger.warning("alert rule %s: a template failed for entity %s: %r", rule.name, row["entity"], exc)
        title = f"{rule.name}: {row['entity']}"
        columns = ", ".join(f"{key}={value}" for key, value in row.items() if key != "entity")
        message = f"Rule {rule.name} fired for {row['entity']} ({columns})."
        click = None
    return Alert(
        rule=rule.name,
        entity=row["entity"],
        title=title,
        message=message,
        priority=rule.priority,
        tags=rule.tags,
        click=click,
        value=row.get("value"),
        count=count,
        created_at=now,
        row=row,
    )
