"""The store: the `cost_events` table and its neighbours, in SQLite or PostgreSQL.

One SQLAlchemy URL selects the backend. In SQLite, `ts` is UTC text of the
form `YYYY-MM-DD HH:MM:SS.ffffff`, so hand-written filters such as
`ts >= datetime('now', '-1 hour')` compare correctly as strings.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine

from .errors import ConfigurationError
from .migrations import upgrade

if TYPE_CHECKING:
    from .events import CostEvent

__all__ = [
    "DEFAULT_DATABASE_URL",
    "INSERT_COLUMNS",
    "SCHEMA_VERSION",
    "Store",
    "cost_events",
    "metadata",
    "ts_text",
]

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///costs.db"
SCHEMA_VERSION = 5

metadata = sa.MetaData()

cost_events = sa.Table(
    "cost_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(32), nullable=False),
    sa.Column("ts", sa.DateTime, nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("request_model", sa.String(255)),
    sa.Column("feature", sa.String(255)),
    sa.Column("user_id", sa.String(255)),
    sa.Column("request_id", sa.String(64)),
    sa.Column("response_id", sa.String(255)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("error_type", sa.String(128)),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("completion_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("input_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_write_5m_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_write_1h_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("cache_read_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("output_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("web_search_requests", sa.Integer, nullable=False, default=0),
    sa.Column("web_fetch_requests", sa.Integer, nullable=False, default=0),
    # Double precision: the sum of buckets is computed exactly with Decimal
    # and rounded once here, far below a cent.
    sa.Column("cost_usd", sa.Float(precision=53)),
    sa.Column("unpriced", sa.Boolean, nullable=False, default=False),
    sa.Column("price_version", sa.String(32)),
    sa.Column("price_id", sa.String(255)),
    sa.Column("service_tier", sa.String(32)),
    sa.Column("latency_ms", sa.Float(precision=53), nullable=False, default=0.0),
    sa.Column("context_missing", sa.Boolean, nullable=False, default=False),
    sa.Column("flags", sa.String(255)),
    sa.Index("uq_cost_events_event_id", "event_id", unique=True),
    # Serves the alert windows and the reports: each scans only its time
    # range. Every other index would cost each insert a write to a random
    # page, so there is none on ts alone, (feature, ts) or (user_id, ts).
    # No query of this package looks up one feature's or one user's rows
    # outside a time range.
    sa.Index("ix_cost_events_cost_ts", "ts", "cost_usd"),
    # NULLs are distinct in unique indexes on both backends, so rows without a
    # response id (failed calls) never collide.
    sa.Index("uq_cost_events_response_id", "response_id", unique=True),
    # Ids are never reused in SQLite either, even after the newest rows are
    # deleted: the daily roll-up finds late rows by id.
    sqlite_autoincrement=True,
)

alert_state = sa.Table(
    "alert_state",
    metadata,
    sa.Column("rule", sa.String(128), primary_key=True),
    sa.Column("entity", sa.String(255), primary_key=True),
    sa.Column("last_fired_at", sa.DateTime, nullable=False),
    sa.Column("window_key", sa.String(64)),
    sa.Column("value", sa.Float(precision=53)),
)

alert_outbox = sa.Table(
    "alert_outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("entity", sa.String(255), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=3),
    sa.Column("tags", sa.String(255)),
    sa.Column("click", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.DateTime, nullable=False),
    sa.Column("delivered_at", sa.DateTime),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_alert_outbox_pending", "delivered_at", "next_attempt_at"),
)

def _daily_total_columns() -> list[sa.Column]:
    """Return new Column objects for the sums that both daily roll-up tables keep."""
    return [
        sa.Column("calls", sa.Integer, nullable=False),
        sa.Column("error_calls", sa.Integer, nullable=False, default=0),
        sa.Column("unpriced_calls", sa.Integer, nullable=False, default=0),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("input_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("cache_write_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("cache_read_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("output_tokens", sa.BigInteger, nullable=False, default=0),
        sa.Column("cost_usd", sa.Float(precision=53)),
        sa.Column("latency_ms_sum", sa.Float(precision=53), nullable=False, default=0.0),
    ]


# Daily totals per provider, model, feature and user, for each complete UTC
# day (see `retention`). Reports read it for days whose raw rows were
# pruned. Rows are additive: two rows for the same group and day are summed,
# never replaced.
cost_daily = sa.Table(
    "cost_daily",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("feature", sa.String(255)),
    sa.Column("user_id", sa.String(255)),
    *_daily_total_columns(),
    sa.Index("ix_cost_daily_day_feature", "day", "feature"),
    sa.Index("ix_cost_daily_day_user", "day", "user_id"),
)

# The same days per provider, model and feature, without the user: small
# enough (features x models rows a day) for baselines that read weeks of it
# on every watcher pass.
cost_daily_feature = sa.Table(
    "cost_daily_feature",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("day", sa.Date, nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("model", sa.String(255), nullable=False),
    sa.Column("feature", sa.String(255)),
    *_daily_total_columns(),
    sa.Index("ix_cost_daily_feature_feature_day", "feature", "day"),
    sa.Index("ix_cost_daily_feature_day", "day"),
)

meta = sa.Table(
    "llmcost_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)


class Store:
    """Owns the engine for one database URL and creates the schema on first use."""

    def __init__(self, url: str = DEFAULT_DATABASE_URL, *, busy_timeout_ms: int = 30_000) -> None:
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
            parsed.port  # noqa: B018 - a port that is not a number fails here, not at first use
        except (sa.exc.ArgumentError, ValueError) as exc:
            raise ConfigurationError(
                f"invalid database URL {_redact(url)!r}: use sqlite:///path/to/costs.db "
                "or postgresql://user:password@host/dbname"
            ) from exc
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigurationError(
                f"unsupported database {self.dialect!r} in {_redact(url)!r}: use a sqlite:/// or postgresql:// URL"
            )
        if self.dialect == "postgresql" and parsed.drivername == "postgresql":
            # psycopg 3 is the driver the `postgres` extra installs.
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            self.engine = self._create_engine(parsed, busy_timeout_ms)
        except ImportError as exc:
            raise ConfigurationError(
                f"the database driver for {_redact(url)!r} is not installed ({exc.name or exc}); "
                "install it with: pip install 'llmcost-mw[postgres]'"
            ) from exc
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        marker = "?" if self.dialect == "sqlite" else "%s"
        self._insert_sql = (
            f"INSERT INTO cost_events ({', '.join(INSERT_COLUMNS)}) "
            f"VALUES ({', '.join([marker] * len(INSERT_COLUMNS))}) ON CONFLICT DO NOTHING"
        )

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for logs."""
        return _redact(self.url)

    def _create_engine(self, url: sa.URL, busy_timeout_ms: int) -> Engine:
        if self.dialect != "sqlite":
            return sa.create_engine(url, pool_pre_ping=True, future=True)

        database = url.database
        if database and database != ":memory:":
            parent = os.path.dirname(os.path.abspath(database))
            if not os.path.isdir(parent):
                raise ConfigurationError(
                    f"the directory of the SQLite file {database!r} does not exist; create {parent!r} first"
                )
        engine = sa.create_engine(
            url,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
            future=True,
        )

        @sa_event.listens_for(engine, "connect")
        def _configure(dbapi_connection: Any, _record: Any) -> None:
            # Autocommit at the driver level, so that the `begin` hook below
            # decides how each transaction starts.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            # Checkpoint every 10,000 pages (about 40 MB of WAL) rather than
            # every 1,000: a page that several batches change is copied into
            # the database once. Batches of 1,000 rows took a third less time
            # per row with it (docs/benchmarks.md, one 2-core machine).
            cursor.execute("PRAGMA wal_autocheckpoint = 10000")
            cursor.close()

        @sa_event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            # Writers take the write lock up front: a deferred transaction that
            # reads and then writes fails at once with "database is locked"
            # when another writer holds it, whatever the busy timeout.
            mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
            connection.exec_driver_sql(f"BEGIN {mode}")

        return engine

    def ensure_schema(self) -> None:
        """Create or upgrade the schema in place, once per Store; see `migrations`."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            # A store already at this version needs no write lock, so readers
            # (reports, the watcher's queries) are not blocked by a writer.
            if self._stored_version() != SCHEMA_VERSION:
                with self.write() as conn:
                    upgrade(conn, metadata, meta, SCHEMA_VERSION, self.safe_url)
            self._schema_ready = True

    def _stored_version(self) -> int | None:
        with self.read() as conn:
            if not sa.inspect(conn).has_table(meta.name):
                return None
            value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
        return int(value) if value is not None else None

    def write(self) -> Any:
        """Open a write transaction; in SQLite it takes the write lock immediately."""
        if self.dialect == "sqlite":
            return self.engine.execution_options(sqlite_begin="IMMEDIATE").begin()
        return self.engine.begin()

    def read(self) -> Any:
        """Open a read-only unit of work."""
        return self.engine.connect()

    def insert_events(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert rows given as dicts of column values; see `insert_values`.

        Missing keys are stored as NULL.
        """
        return self.insert_values([self.row_values(row) for row in rows])

    def insert_values(self, values: Sequence[tuple[Any, ...]]) -> int:
        """Insert rows in one transaction, skipping event or response ids already stored.

        Each row is a tuple in `INSERT_COLUMNS` order, as `event_values` or
        `row_values` build it. Returns the number of rows inserted.
        """
        if not values:
            return 0
        self.ensure_schema()
        with self.write() as conn:
            before = self._total_changes(conn)
            result = conn.exec_driver_sql(self._insert_sql, values)
            after = self._total_changes(conn)
        if before is not None and after is not None:
            return after - before
        return result.rowcount if result.rowcount is not None and result.rowcount >= 0 else len(values)

    def check_writable(self) -> None:
        """Open a write transaction that reads `cost_events`; raise when the store cannot do that now."""
        self.ensure_schema()
        with self.write() as conn:
            conn.execute(sa.select(cost_events.c.id).limit(0))

    def event_values(self, event: CostEvent) -> tuple[Any, ...]:
        """Return the inserted values of a cost event, in this backend's form."""
        return event.values(ts_as_text=self.dialect == "sqlite")

    def row_values(self, row: dict[str, Any]) -> tuple[Any, ...]:
        """Return the inserted values of a row dict, in this backend's form."""
        try:
            values = _row_getter(row)
        except KeyError:
            values = tuple(row.get(name) for name in INSERT_COLUMNS)
        ts = values[_TS_INDEX]
        if isinstance(ts, datetime) and (self.dialect == "sqlite" or ts.tzinfo is not None):
            # Naive UTC in PostgreSQL too: an aware value would be converted
            # to the session's time zone, which need not be UTC.
            stored = ts_text(ts) if self.dialect == "sqlite" else ts.astimezone(UTC).replace(tzinfo=None)
            values = (*values[:_TS_INDEX], stored, *values[_TS_INDEX + 1 :])
        return values

    def _total_changes(self, conn: Connection) -> int | None:
        # SQLite counts the rows each connection changed; the difference is the
        # number inserted, duplicates excluded. psycopg reports the same number
        # as the rowcount of executemany.
        if self.dialect != "sqlite":
            return None
        return int(conn.connection.dbapi_connection.total_changes)

    def schema_version(self) -> int:
        self.ensure_schema()
        with self.read() as conn:
            value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar_one()
        return int(value)

    def count_events(self) -> int:
        self.ensure_schema()
        with self.read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(cost_events)).scalar_one())

    def fetch_events(self, *where: Any) -> list[dict[str, Any]]:
        """Return rows of `cost_events` as dicts, oldest first; meant for tests and small reports."""
        self.ensure_schema()
        query = sa.select(cost_events).where(*where).order_by(cost_events.c.id)
        with self.read() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    def dispose(self) -> None:
        self.engine.dispose()


def _redact(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):
        # Still show the value, with anything between "user:" and "@" masked.
        return re.sub(r"(//[^/@:]*):[^/@]*@", r"\1:***@", url)


# The columns an insert fills, in order: every column but `id`.
INSERT_COLUMNS = tuple(column.name for column in cost_events.columns if column.name != "id")
_TS_INDEX = INSERT_COLUMNS.index("ts")
# Builds the tuple of a row dict at C speed: per-column work in Python runs
# on the writer thread and competes with the app's threads for the GIL.
_row_getter = operator.itemgetter(*INSERT_COLUMNS)


def ts_text(ts: datetime) -> str:
    """Return `ts` as UTC text in the form SQLAlchemy's DateTime uses in SQLite.

    Hand-written filters such as `ts >= datetime('now', '-1 hour')` rely on it.
    """
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(" ", "microseconds")
