"""Alert rules as data: a SQL query with named binds, message templates and paging options.

A rule's query returns one row per entity (user, feature, model, or a single
request) that is over its limit. Every row has an `entity` column, usually a
`value` column with the measured number, and the other columns that the
rule's `title` and `message` templates use (`str.format` fields).

The watcher binds these values, computed from its clock (naive UTC):

* `:now` is the time of the pass.
* `:since` is `now` minus the rule's `lookback_seconds`.
* `:day_start` is 00:00 UTC of the current day.

Every key of the rule's `params` (such as `:threshold`) is bound as well.
Datetimes are bound with SQLAlchemy's `DateTime` type, so the same SQL runs on
SQLite (where `ts` is text) and on PostgreSQL. Rule SQL must never read the
database clock (`datetime('now')`, `now()`), because tests and replays inject
their own clock.

A pass stops a rule's queries after its `timeout_seconds` (30 by default),
logs the rule as skipped and runs the next one, so a runaway query cannot
stall the watcher.

`builtin_rules()` returns the five built-in rules. `load_rules(path)` reads a
TOML file that adds rules or overrides the built-in ones. The params of the
built-in rules are checked for range as well as type (no negative
threshold, a percentile in (0, 100]):

    [rules.user_hourly_spend]
    cooldown_seconds = 1800
    priority = 5
    params = { threshold = 10.0 }

    [rules.unpriced_model]
    enabled = false

    [rules.opus_spend]
    sql = '''
        SELECT feature AS entity, SUM(cost_usd) AS value
        FROM cost_events
        WHERE ts >= :since AND model LIKE 'claude-opus%'
        GROUP BY feature
        HAVING SUM(cost_usd) > :threshold
    '''
    params = { threshold = 20.0 }
    title = "Opus spend of {entity}: ${value:.2f}"
    message = "Feature {entity} spent ${value:.2f} on Opus in the last hour."
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import string
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from time import monotonic
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import TextClause

from ..errors import RuleError, RuleTimeoutError
from ..store import Store, metadata
from .baseline import feature_daily_limits

__all__ = [
    "CLOCK_BINDS",
    "TEMPLATE_FIELDS",
    "EntityThresholds",
    "Rule",
    "builtin_rules",
    "check_rule",
    "load_rules",
    "parse_rules",
]

# Binds that the watcher fills from its clock; every other bind must be a key of `params`.
CLOCK_BINDS = frozenset({"now", "since", "day_start", "today", "week_start"})

# Template fields that the watcher adds to each row's columns and the rule's params.
TEMPLATE_FIELDS = frozenset({"rule", "entity", "count", "threshold", "lookback_minutes", "now"})

WINDOWS = (None, "day")

# ntfy topics and our `alert_state.rule` column both fit this.
_RULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# The spend sums are sums of doubles, which drift by about 1e-15 per row: a
# millionth of a dollar of slack keeps a total of exactly the limit from firing.
_SPEND_SLACK = "0.000001"

# Computes a threshold per entity, for rules whose limit is a baseline rather
# than one number. It receives the connection and the binds of the pass and
# returns {entity: threshold}; entities missing from the result fall back to
# `params["threshold"]`.
EntityThresholds = Callable[[Connection, Mapping[str, Any]], Mapping[str, float]]


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule: what to query, when it fires and what the notification contains.

    `cooldown_seconds` is the minimum time between two notifications for one
    entity. With `window="day"` an entity also pages at most once per UTC day.
    With `combine_rows=True` every row is its own entity (a request id, for
    example) that fires once, and all new rows of one pass become a single
    notification: its templates see the columns of the row with the highest
    `value` and `count`, the number of new rows. For such rules
    `cooldown_seconds` is the minimum time between two notifications of the
    rule, and rows found inside it are reported by the next notification
    while they are still within the lookback.
    """

    name: str
    sql: TextClause
    title: str
    message: str
    params: Mapping[str, Any] = field(default_factory=dict)
    cooldown_seconds: float = 3600.0
    priority: int = 3
    tags: tuple[str, ...] = ()
    window: str | None = None
    lookback_seconds: float = 3600.0
    combine_rows: bool = False
    click: str | None = None
    entity_thresholds: EntityThresholds | None = None
    # A pass stops the rule's queries after this long, so that one slow or
    # runaway query cannot hold up the other rules and the deliveries.
    timeout_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _RULE_NAME.fullmatch(self.name):
            raise RuleError(
                f"invalid rule name {self.name!r}: use 1 to 128 letters, digits, '_', '.' or '-', "
                "starting with a letter, digit or '_'"
            )
        if isinstance(self.sql, str):
            object.__setattr__(self, "sql", sa.text(self.sql))
        if not isinstance(self.sql, TextClause):
            raise _rule_error(
                self.name, "sql", f"sql must be a string or sqlalchemy.text(), not {type(self.sql).__name__}"
            )
        object.__setattr__(self, "params", dict(self.params))
        object.__setattr__(self, "tags", tuple(self.tags))

        if (
            isinstance(self.priority, bool)
            or not isinstance(self.priority, int)
            or not 1 <= self.priority <= 5
        ):
            raise _rule_error(
                self.name, "priority", f"invalid priority {self.priority!r}: use an integer from 1 to 5"
            )
        timeout = self.timeout_seconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
            raise _rule_error(
                self.name,
                "timeout_seconds",
                f"invalid timeout_seconds {timeout!r}: use a number of seconds above 0",
            )
        for option in ("cooldown_seconds", "lookback_seconds"):
            value = getattr(self, option)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise _rule_error(
                    self.name, option, f"invalid {option} {value!r}: use a number of seconds >= 0"
                )
        if self.window not in WINDOWS:
            raise _rule_error(self.name, "window", f"invalid window {self.window!r}: use 'day' or None")

        unknown = self.bind_names - CLOCK_BINDS - set(self.params)
        if unknown:
            raise _rule_error(
                self.name,
                "sql",
                f"unknown bind {', '.join(':' + n for n in sorted(unknown))} in sql; "
                f"binds are {', '.join(':' + n for n in sorted(CLOCK_BINDS | set(self.params)))} "
                "(add the missing ones to params)",
            )
        # Fails early on a malformed template, such as an unclosed brace.
        self.template_fields()

    @property
    def bind_names(self) -> frozenset[str]:
        """Names of the binds (`:name`) that the SQL uses."""
        return frozenset(self.sql.compile().params)

    def binds(self, now: datetime) -> dict[str, Any]:
        """Return the params and clock binds for a pass at `now` (naive UTC), used by the SQL or not."""
        return {
            **self.params,
            "now": now,
            "since": now - timedelta(seconds=self.lookback_seconds),
            "day_start": datetime.combine(now.date(), time.min),
            # Dates, for the `day` column of the daily roll-ups.
            "today": now.date(),
            "week_start": now.date() - timedelta(days=7),
        }

    def bound_sql(self, now: datetime) -> TextClause:
        """Return the SQL with every bind typed and set for a pass at `now`."""
        values = self.binds(now)
        bound = []
        for name in self.bind_names:
            value = values[name]
            if isinstance(value, datetime):
                bound.append(sa.bindparam(name, value, type_=sa.DateTime))
            elif isinstance(value, date):
                bound.append(sa.bindparam(name, value, type_=sa.Date))
            else:
                bound.append(sa.bindparam(name, value))
        return self.sql.bindparams(*bound)

    def evaluate(self, conn: Connection, now: datetime) -> list[dict[str, Any]]:
        """Run the query and return the rows over the limit, each with a `str` entity.

        Rows with a NULL entity are dropped. When `entity_thresholds` is set,
        a row is kept only if its `value` is over its entity's threshold,
        which is stored in the row's `threshold` column. Raises
        RuleTimeoutError when a query runs past `timeout_seconds`.
        """
        with _time_limit(conn, self.name, self.timeout_seconds):
            result = conn.execute(self.bound_sql(now))
            rows = []
            for mapping in result.mappings():
                row = dict(mapping)
                if row.get("entity") is None:
                    continue
                # NOTE: alert_state.entity is 255 characters long. Longer entities
                # are cut, so two of them that share a prefix share a cooldown.
                row["entity"] = str(row["entity"])[:255]
                rows.append(row)
            if self.entity_thresholds is None:
                return rows
            thresholds = self.entity_thresholds(conn, self.binds(now))
        default = self.params.get("threshold")
        kept = []
        for row in rows:
            threshold = thresholds.get(row["entity"], default)
            if threshold is not None:
                value = row.get("value")
                # The slack keeps float sums of exact cents (25 x 0.20 is
                # 5.000000000000002) from firing at the threshold itself.
                if value is None or value <= threshold + float(_SPEND_SLACK):
                    continue
            row["threshold"] = threshold
            kept.append(row)
        return kept

    def template_context(self, row: Mapping[str, Any], *, count: int, now: datetime) -> dict[str, Any]:
        """Return the fields the templates see: params, then the row's columns, then the watcher's fields."""
        return {
            **self.params,
            **row,
            "rule": self.name,
            "entity": row["entity"],
            "count": count,
            "lookback_minutes": self.lookback_seconds / 60,
            "now": now,
        }

    def template_fields(self) -> dict[str, set[str]]:
        """Return the top-level field names that each template uses; raise RuleError if one is malformed."""
        fields = {}
        for key in ("title", "message", "click"):
            template = getattr(self, key)
            if template is None:
                continue
            try:
                fields[key] = _format_fields(template)
            except ValueError as exc:
                raise _rule_error(self.name, key, f"invalid {key} template: {exc}") from exc
        return fields


@contextlib.contextmanager
def _time_limit(conn: Connection, rule: str, seconds: float) -> Iterator[None]:
    """Stop the queries run on `conn` inside this block after `seconds`, raising RuleTimeoutError.

    SQLite checks a deadline from a progress handler, which it calls every
    few thousand virtual machine instructions; PostgreSQL applies
    `statement_timeout` to each statement of the transaction.
    """
    deadline = monotonic() + seconds
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        dbapi_connection = conn.connection.dbapi_connection
        # A true result interrupts the statement with "interrupted".
        dbapi_connection.set_progress_handler(lambda: monotonic() > deadline, 10_000)
    else:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
    try:
        yield
    except sa.exc.OperationalError as exc:
        if monotonic() < deadline:
            raise
        raise RuleTimeoutError(
            f"alert rule {rule!r} ran longer than its timeout_seconds of {seconds:g} s and was stopped; "
            "narrow its query or raise timeout_seconds in the rules file"
        ) from exc
    finally:
        if sqlite:
            dbapi_connection.set_progress_handler(None, 0)


def _rule_error(rule: str, field: str, problem: str) -> RuleError:
    """Build a RuleError whose `field` names the rule option at fault, so a file loader can find its line."""
    error = RuleError(f"rule {rule!r}: {problem}")
    error.field = field  # type: ignore[attr-defined]
    return error


def _format_fields(template: str) -> set[str]:
    names = set()
    for _literal, field_name, format_spec, _conversion in string.Formatter().parse(template):
        if field_name is None:
            continue
        root = re.split(r"[.\[]", field_name, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(
                "positional fields such as {} or {0} are not allowed; name a column, e.g. {entity}"
            )
        names.add(root)
        if format_spec and "{" in format_spec:
            names |= _format_fields(format_spec)
    return names


def builtin_rules() -> list[Rule]:
    """Return the built-in rules with their default thresholds, as new objects.

    Every window is closed (`ts >= :since AND ts <= :now`): SQLite's planner,
    without table statistics, takes an open range to hold a quarter of the
    table and walks a whole index instead. A row stamped after the watcher's
    clock (a host whose clock runs ahead) is counted by a later pass.
    """
    return [
        Rule(
            name="user_hourly_spend",
            sql=sa.text(
                "SELECT user_id AS entity, SUM(cost_usd) AS value, COUNT(*) AS calls\n"
                "FROM cost_events\n"
                "WHERE ts >= :since AND ts <= :now AND user_id IS NOT NULL AND cost_usd IS NOT NULL\n"
                "GROUP BY user_id\n"
                f"HAVING SUM(cost_usd) > :threshold + {_SPEND_SLACK}"
            ),
            params={"threshold": 5.00},
            title="User {entity} spent ${value:.2f} in {lookback_minutes:.0f} minutes",
            message=(
                "User {entity} spent ${value:.2f} over {calls} calls in the last {lookback_minutes:.0f} "
                "minutes, above the ${threshold:.2f} limit."
            ),
            cooldown_seconds=3600,
            priority=4,
            tags=("moneybag",),
        ),
        Rule(
            name="feature_daily_spend",
            sql=sa.text(
                "SELECT feature AS entity, SUM(cost_usd) AS value, COUNT(*) AS calls\n"
                "FROM cost_events\n"
                "WHERE ts >= :day_start AND ts <= :now AND feature IS NOT NULL AND cost_usd IS NOT NULL\n"
                "GROUP BY feature"
            ),
            # `threshold` is the hard ceiling, used until a feature has
            # `min_history_days` of history; then the limit is
            # `baseline_factor` times the p95 of its last 7 complete days.
            params={
                "threshold": 50.00,
                "baseline_factor": 1.5,
                "baseline_percentile": 95,
                "min_history_days": 30,
                "min_threshold": 1.00,
            },
            entity_thresholds=feature_daily_limits,
            title="Feature {entity} spent ${value:.2f} today (UTC)",
            message=(
                "Feature {entity} spent ${value:.2f} over {calls} calls since 00:00 UTC, "
                "above its ${threshold:.2f} daily limit."
            ),
            # The day window already limits it to one page per feature and day.
            cooldown_seconds=0,
            window="day",
            priority=4,
            tags=("chart_with_upwards_trend",),
        ),
        Rule(
            name="request_cost",
            sql=sa.text(
                "SELECT id AS entity, cost_usd AS value, model,\n"
                "       COALESCE(feature, '-') AS feature, COALESCE(user_id, '-') AS user_id\n"
                "FROM cost_events\n"
                "WHERE ts >= :since AND ts <= :now AND cost_usd > :threshold"
            ),
            params={"threshold": 0.50},
            title="Request cost ${value:.2f} ({model})",
            message=(
                "New requests over ${threshold:.2f} in the last {lookback_minutes:.0f} minutes: {count}. "
                "The costliest cost ${value:.2f}: model {model}, feature {feature}, user {user_id}, "
                "cost_events id {entity}."
            ),
            cooldown_seconds=0,
            combine_rows=True,
            priority=3,
            tags=("money_with_wings",),
        ),
        Rule(
            name="unpriced_model",
            sql=sa.text(
                "SELECT model AS entity, COUNT(*) AS value, COUNT(*) AS calls\n"
                "FROM cost_events\n"
                "WHERE ts >= :since AND ts <= :now AND unpriced = TRUE\n"
                # A call whose usage was never reported (a chat stream without
                # include_usage) or could not be read is unpriced too, but a
                # price row would not fix it.
                "  AND (flags IS NULL\n"
                "       OR (flags NOT LIKE '%usage_unknown%' AND flags NOT LIKE '%usage_invalid%'))\n"
                "GROUP BY model\n"
                "HAVING COUNT(*) > :threshold"
            ),
            params={"threshold": 0},
            title="Unpriced model {entity}",
            message=(
                "{calls} calls to model {entity} in the last {lookback_minutes:.0f} minutes have no price, "
                "so their cost is recorded as unknown. Add the model to the price table."
            ),
            # A missing price needs a change to the price table, so a daily reminder is enough.
            cooldown_seconds=86400,
            priority=3,
            tags=("warning",),
        ),
        Rule(
            name="request_shape",
            # The last hour against the last 7 complete days, from the daily
            # roll-ups: the slow creep of a growing prompt shows up as more
            # tokens per call, before the spend rules fire.
            sql=sa.text(
                "SELECT h.feature AS entity, h.avg_tokens AS value, h.calls AS calls,\n"
                "       w.avg_tokens AS baseline_tokens\n"
                "FROM (SELECT feature, SUM(prompt_tokens + completion_tokens) * 1.0 / COUNT(*) AS avg_tokens,\n"
                "             COUNT(*) AS calls\n"
                "      FROM cost_events WHERE ts >= :since AND ts <= :now AND feature IS NOT NULL\n"
                "      GROUP BY feature HAVING COUNT(*) >= :min_calls) h\n"
                "JOIN (SELECT feature, SUM(prompt_tokens + completion_tokens) * 1.0 / SUM(calls) AS avg_tokens\n"
                "      FROM cost_daily_feature WHERE day >= :week_start AND day < :today AND feature IS NOT NULL\n"
                "      GROUP BY feature HAVING SUM(calls) > 0) w ON w.feature = h.feature\n"
                "WHERE h.avg_tokens > :factor * w.avg_tokens"
            ),
            params={"factor": 3.0, "min_calls": 20},
            title="Feature {entity}: {value:.0f} tokens per call, {factor:g}x its usual size",
            message=(
                "Feature {entity} averaged {value:.0f} tokens per call over {calls} calls in the last "
                "{lookback_minutes:.0f} minutes, against {baseline_tokens:.0f} over the last 7 days. "
                "A prompt may have grown."
            ),
            cooldown_seconds=6 * 3600,
            priority=3,
            tags=("straight_ruler",),
        ),
    ]


# ---------------------------------------------------------------------------
# Rules files


# Keys of a `[rules.NAME]` table, with the TOML types each accepts.
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "sql": (str,),
    "title": (str,),
    "message": (str,),
    "click": (str,),
    "params": (dict,),
    "cooldown_seconds": (int, float),
    "lookback_seconds": (int, float),
    "timeout_seconds": (int, float),
    "priority": (int,),
    "tags": (list,),
    "window": (str,),
    "combine_rows": (bool,),
    "enabled": (bool,),
}
_REQUIRED_FOR_NEW = ("sql", "title", "message")
_PARAM_TYPES = (str, int, float, bool, datetime, date, time)


def load_rules(path: str | Path, *, store: Store | None = None) -> list[Rule]:
    """Read a TOML rules file and return the built-in rules with its overrides, then its new rules.

    Each rule's SQL is checked by running it with `LIMIT 0`: against `store`
    when given, otherwise against an empty in-memory SQLite database with the
    same schema (so SQL that only PostgreSQL understands needs `store`).
    Raises RuleError naming the file, line and rule of the first problem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleError(f"cannot read the rules file {str(path)!r}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise RuleError(f"the rules file {str(path)!r} is not valid UTF-8: {exc}") from exc
    return parse_rules(text, source=str(path), store=store)


def parse_rules(text: str, *, source: str = "<rules>", store: Store | None = None) -> list[Rule]:
    """Parse the text of a rules file; see `load_rules`."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{source}: invalid TOML: {exc}") from exc

    locator = _Locator(text, source)
    extra = set(document) - {"rules"}
    if extra:
        key = sorted(extra)[0]
        raise RuleError(
            f"{locator.where(None, key)}unknown top-level key {key!r}: "
            "define each rule as a [rules.NAME] table"
        )
    tables = document.get("rules", {})
    if not isinstance(tables, dict):
        raise RuleError(f"{locator.where(None, 'rules')}'rules' must be a table of [rules.NAME] tables")

    builtins = {rule.name: rule for rule in builtin_rules()}
    result = dict(builtins)
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise RuleError(f"{locator.where(name)}rule {name!r}: must be a table, not {_toml_type(table)}")
        if name in builtins:
            rule = _override_rule(builtins[name], table, locator)
        else:
            rule = _new_rule(name, table, locator)
        if rule is None:
            del result[name]
        else:
            result[name] = rule

    rules = list(result.values())
    _check_all(rules, tables, locator, store)
    return rules


def check_rule(rule: Rule, conn: Connection, now: datetime | None = None) -> list[str]:
    """Run the rule's query with `LIMIT 0` and check its columns against its templates.

    Returns the column names. Raises RuleError when the SQL fails, when it
    returns no `entity` column, or when a template uses a field that neither
    the row, the params nor the watcher provide.
    """
    now = now or datetime(2000, 1, 1)
    # The newline keeps a trailing `-- comment` in the rule from swallowing the
    # wrapper, and the subquery rejects anything but a single SELECT.
    body = rule.sql.text.strip().rstrip(";")
    probe = sa.text(f"SELECT * FROM (\n{body}\n) AS rule_query LIMIT 0")
    statement = dataclasses.replace(rule, sql=probe).bound_sql(now)
    transaction = conn.begin_nested() if conn.in_transaction() else conn.begin()
    try:
        columns = list(conn.execute(statement).keys())
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise _rule_error(
            rule.name, "sql", f"the sql failed: {detail}; it must be one SELECT over the store's tables"
        ) from exc
    finally:
        transaction.rollback()

    if "entity" not in columns:
        raise _rule_error(
            rule.name,
            "sql",
            f"the sql returns no 'entity' column (columns: {', '.join(columns)}); "
            "select the user, feature or other key AS entity",
        )
    known = set(columns) | set(rule.params) | TEMPLATE_FIELDS
    for key, names in rule.template_fields().items():
        missing = names - known
        if missing:
            raise _rule_error(
                rule.name,
                key,
                f"the {key} template uses {', '.join(sorted(missing))}, "
                f"which is not a column, param or watcher field; columns are {', '.join(columns)}",
            )
    return columns


def _check_all(rules: list[Rule], tables: Mapping[str, Any], locator: _Locator, store: Store | None) -> None:
    if store is not None:
        store.ensure_schema()
        engine = store.engine
    else:
        engine = sa.create_engine("sqlite://")
        metadata.create_all(engine)
    try:
        with engine.connect() as conn:
            for rule in rules:
                try:
                    check_rule(rule, conn)
                except RuleError as exc:
                    raise _locate(exc, rule.name, tables, locator) from exc
    finally:
        if store is None:
            engine.dispose()


def _override_rule(builtin: Rule, table: dict[str, Any], locator: _Locator) -> Rule | None:
    name = builtin.name
    if "sql" in table:
        raise RuleError(
            f"{locator.where(name, 'sql')}rule {name!r}: the sql of a built-in rule cannot be replaced; "
            "define a rule with a new name and set enabled = false here"
        )
    options = _read_options(name, table, locator)
    if not options.pop("enabled", True):
        return None

    params = options.pop("params", None)
    if params is not None:
        for key, value in params.items():
            if key not in builtin.params:
                raise RuleError(
                    f"{locator.where(name, 'params', key)}rule {name!r}: unknown param {key!r}; "
                    f"this built-in rule has {', '.join(sorted(builtin.params))}"
                )
            default = builtin.params[key]
            if isinstance(default, int | float) and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise RuleError(
                    f"{locator.where(name, 'params', key)}rule {name!r}: param {key!r} must be a number, "
                    f"not {_toml_type(value)}"
                )
            problem = _param_range_problem(key, value)
            if problem:
                raise RuleError(f"{locator.where(name, 'params', key)}rule {name!r}: {problem}")
        options["params"] = {**builtin.params, **params}
    try:
        return dataclasses.replace(builtin, **options)
    except RuleError as exc:
        raise _locate(exc, name, {name: table}, locator) from exc


def _new_rule(name: str, table: dict[str, Any], locator: _Locator) -> Rule | None:
    for key in _REQUIRED_FOR_NEW:
        if key not in table:
            raise RuleError(
                f"{locator.where(name)}rule {name!r}: missing {key!r}; a new rule needs "
                f"{', '.join(_REQUIRED_FOR_NEW)} "
                f"(the built-in rules are {', '.join(rule.name for rule in builtin_rules())})"
            )
    options = _read_options(name, table, locator)
    if not options.pop("enabled", True):
        return None
    if not options["sql"].strip():
        raise RuleError(f"{locator.where(name, 'sql')}rule {name!r}: sql is empty")
    try:
        return Rule(name=name, **options)
    except RuleError as exc:
        raise _locate(exc, name, {name: table}, locator) from exc


def _locate(error: RuleError, name: str, tables: Mapping[str, Any], locator: _Locator) -> RuleError:
    """Prefix the error with the file and the line of the option at fault, when the file sets it."""
    table = tables.get(name)
    if table is None:
        return RuleError(f"{locator.source}: {error}")
    field = getattr(error, "field", None)
    return RuleError(f"{locator.where(name, field if field in table else None)}{error}")


def _read_options(name: str, table: dict[str, Any], locator: _Locator) -> dict[str, Any]:
    """Check the keys and TOML types of one rule table and convert them to Rule fields."""
    options: dict[str, Any] = {}
    for key, value in table.items():
        types = _KEY_TYPES.get(key)
        if types is None:
            hint = f"; put it under [rules.{name}.params]" if key == "threshold" else ""
            raise RuleError(
                f"{locator.where(name, key)}rule {name!r}: unknown key {key!r}{hint}; "
                f"keys are {', '.join(sorted(_KEY_TYPES))}"
            )
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            raise RuleError(
                f"{locator.where(name, key)}rule {name!r}: {key} must be {expected}, not {_toml_type(value)}"
            )
        options[key] = value

    if "tags" in options:
        if not all(isinstance(tag, str) and tag and "," not in tag for tag in options["tags"]):
            raise RuleError(
                f"{locator.where(name, 'tags')}rule {name!r}: "
                "tags must be a list of non-empty strings without commas"
            )
        options["tags"] = tuple(options["tags"])
    if "window" in options:
        if options["window"] not in ("day", "none"):
            raise RuleError(
                f"{locator.where(name, 'window')}rule {name!r}: invalid window {options['window']!r}: "
                'use "day" (at most one page per entity and UTC day) or "none"'
            )
        options["window"] = None if options["window"] == "none" else "day"
    for key, value in options.get("params", {}).items():
        if not isinstance(value, _PARAM_TYPES):
            raise RuleError(
                f"{locator.where(name, 'params', key)}rule {name!r}: param {key!r} must be a string, number, "
                f"boolean or date, not {_toml_type(value)}"
            )
        # TOML allows nan and inf: no value is above nan, and every value is below inf.
        if isinstance(value, float) and not math.isfinite(value):
            raise RuleError(
                f"{locator.where(name, 'params', key)}rule {name!r}: invalid param {key!r} = {value!r}: "
                "use a finite number"
            )
    return options


# The values that the params of the built-in rules accept: the lowest value,
# whether the lowest itself is allowed, the highest, and whether it must be
# a whole number. A zero or negative factor or percentile would make a rule
# fire on every pass or never.
_BUILTIN_PARAM_RANGES: dict[str, tuple[float, bool, float, bool]] = {
    "threshold": (0, True, math.inf, False),
    "min_threshold": (0, True, math.inf, False),
    "baseline_factor": (0, False, math.inf, False),
    "baseline_percentile": (0, False, 100, False),
    "min_history_days": (0, True, math.inf, True),
    "factor": (0, False, math.inf, False),
    "min_calls": (1, True, math.inf, True),
}


def _param_range_problem(key: str, value: Any) -> str | None:
    """Return why `value` is out of range for the built-in param `key`, or None when it is fine."""
    limits = _BUILTIN_PARAM_RANGES.get(key)
    if limits is None or not isinstance(value, int | float):
        return None
    low, low_allowed, high, whole = limits
    if whole and not isinstance(value, int):
        return f"invalid param {key!r} = {value!r}: use a whole number"
    below = value < low or (value == low and not low_allowed)
    if below or value > high:
        lowest = f">= {low:g}" if low_allowed else f"above {low:g}"
        highest = "" if high == math.inf else f" and at most {high:g}"
        return f"invalid param {key!r} = {value!r}: use a number {lowest}{highest}"
    return None


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for python_type, label in _TYPE_NAMES.items():
        if isinstance(value, python_type):
            return label
    return type(value).__name__


class _Locator:
    """Finds the line of a rule or one of its keys in the file text, for error messages.

    tomllib reports no positions, so this searches for the `[rules.NAME]`
    header and the `key =` line below it. It handles the usual layouts; for
    others it falls back to the header line, or to no line at all.
    """

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def where(self, rule: str | None, *keys: str | None) -> str:
        """Return a 'source, line N: ' prefix for the rule and key path."""
        line = self._find(rule, [key for key in keys if key])
        return f"{self.source}, line {line}: " if line else f"{self.source}: "

    def _find(self, rule: str | None, keys: list[str]) -> int | None:
        if rule is None:
            line = self._find_key(0, len(self.lines), keys[0]) if keys else None
            return None if line is None else line + 1
        name = re.escape(rule)
        quoted = rf"(?:{name}|\"{name}\"|'{name}')"
        header = self._find_line(rf"\s*\[\s*rules\s*\.\s*{quoted}\s*\]")
        if header is None:
            # `rules.NAME.key = ...` at top level, or an inline table.
            return self._find_line(rf"\s*rules\s*\.\s*{quoted}\b") or self._find_line(rf".*\b{name}\b")
        if not keys:
            return header + 1

        end = self._section_end(header)
        line = self._find_key(header + 1, end, keys[0])
        if len(keys) > 1:
            sub_header = self._find_line(rf"\s*\[\s*rules\s*\.\s*{quoted}\s*\.\s*{re.escape(keys[0])}\s*\]")
            if sub_header is not None:
                nested = self._find_key(sub_header + 1, self._section_end(sub_header), keys[1])
                return (nested or sub_header) + 1
            if line is not None and re.search(rf"\b{re.escape(keys[1])}\s*=", self.lines[line]):
                return line + 1
            dotted = self._find_key(header + 1, end, f"{keys[0]}.{keys[1]}")
            if dotted is not None:
                return dotted + 1
        return (line if line is not None else header) + 1

    def _find_line(self, pattern: str, start: int = 0) -> int | None:
        regex = re.compile(pattern)
        for index in range(start, len(self.lines)):
            if regex.match(self.lines[index]):
                return index
        return None

    def _find_key(self, start: int, end: int, key: str) -> int | None:
        parts = [re.escape(part) for part in key.split(".")]
        regex = re.compile(r"\s*" + r"\s*\.\s*".join(rf"(?:{p}|\"{p}\")" for p in parts) + r"\s*=")
        for index in range(start, end):
            if regex.match(self.lines[index]):
                return index
        return None

    def _section_end(self, header: int) -> int:
        for index in range(header + 1, len(self.lines)):
            if re.match(r"\s*\[", self.lines[index]):
                return index
        return len(self.lines)
