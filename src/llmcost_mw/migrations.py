"""In-place schema upgrades of a store, recorded as `schema_version` in `llmcost_meta`.

Versions:

- 0: a `cost_events` table without `llmcost_meta`, as a plain cost logger
  writes it (the contract columns only, `ts` possibly ISO text with a `T`).
- 1: the first schema of this package.
- 2: adds the `cost_daily` roll-up table.
- 3: SQLite ids of `cost_events` are never reused (AUTOINCREMENT), which
  the roll-up relies on to find rows that arrive late.
- 4: adds `cost_daily_feature` (filled from `cost_daily`), and drops the
  indexes on `ts` and `(feature, ts)`, which `(ts, cost_usd)` makes
  redundant and which slowed every insert.
- 5: drops the index on `(user_id, ts)`, which no query of the package
  used and which took about a third of each insert's time.

Every upgrade adds what is missing and keeps every row. It runs in one
transaction, under the SQLite write lock or a PostgreSQL advisory lock, so
processes starting together upgrade once.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

__all__ = ["upgrade"]

logger = logging.getLogger(__name__)

# An arbitrary constant that names this package's schema lock in PostgreSQL.
_ADVISORY_LOCK_KEY = 0x6C6C6D63

# Indexes of `cost_events` that earlier versions created and later dropped.
_DROPPED_INDEXES = ("ix_cost_events_ts", "ix_cost_events_feature_ts", "ix_cost_events_user_ts")

# Defaults for NOT NULL columns added to existing rows.
_ADDED_DEFAULTS: dict[str, str] = {
    "status": "'ok'",
    "unpriced": "FALSE",
    "context_missing": "FALSE",
    "latency_ms": "0",
}


def upgrade(conn: Connection, tables: Any, meta_table: sa.Table, target_version: int, url_for_logs: str) -> None:
    """Bring the schema on `conn` to `target_version`; `tables` is the package's MetaData."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_ADVISORY_LOCK_KEY})")
    inspector = sa.inspect(conn)
    existing = set(inspector.get_table_names())

    if "llmcost_meta" in existing:
        value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == "schema_version")).scalar()
        version = int(value) if value is not None else 0
    else:
        version = 0 if "cost_events" in existing else target_version

    if version > target_version:
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"the store at {url_for_logs} has schema version {version}, newer than this package's "
            f"{target_version}; upgrade llmcost-mw"
        )

    if "cost_events" in existing and version < target_version:
        _add_missing_columns(conn, tables.tables["cost_events"], inspector)
        if version == 0:
            _adopt_plain_log(conn)
        if conn.dialect.name == "sqlite":
            _rebuild_with_autoincrement(conn, tables.tables["cost_events"], inspector)
            inspector = sa.inspect(conn)
    # New tables of every version; existing tables are left alone, so their
    # missing indexes are created one by one.
    tables.create_all(conn, checkfirst=True)
    if "cost_events" in existing and version < 5:
        for name in _DROPPED_INDEXES:
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")
    if "cost_daily" in existing and "cost_daily_feature" not in existing:
        _fill_feature_rollups(conn)
    if version < target_version:
        for name in existing & set(tables.tables):
            _add_missing_indexes(conn, tables.tables[name], inspector)

    if "llmcost_meta" not in existing or version == 0:
        conn.execute(sa.delete(meta_table).where(meta_table.c.key == "schema_version"))
        conn.execute(sa.insert(meta_table).values(key="schema_version", value=str(target_version)))
    elif version < target_version:
        conn.execute(
            sa.update(meta_table).where(meta_table.c.key == "schema_version").values(value=str(target_version))
        )
    if version < target_version and "cost_events" in existing:
        logger.info("upgraded the store at %s from schema version %d to %d", url_for_logs, version, target_version)


def _add_missing_columns(conn: Connection, table: sa.Table, inspector: Any) -> None:
    present = {column["name"] for column in inspector.get_columns(table.name)}
    for column in table.columns:
        if column.name in present:
            continue
        ddl_type = column.type.compile(dialect=conn.dialect)
        default = _ADDED_DEFAULTS.get(column.name)
        if default is None and isinstance(column.type, sa.Integer):
            default = "0"
        clause = f" NOT NULL DEFAULT {default}" if default is not None else ""
        conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {ddl_type}{clause}")


def _rebuild_with_autoincrement(conn: Connection, table: sa.Table, inspector: Any) -> None:
    """Copy an SQLite table into a new one declared AUTOINCREMENT; SQLite cannot alter that in place."""
    ddl = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table.name,)
    ).scalar()
    if ddl is None or "AUTOINCREMENT" in ddl.upper():
        return
    for index in inspector.get_indexes(table.name):
        conn.exec_driver_sql(f'DROP INDEX "{index["name"]}"')
    old_name = f"{table.name}_before_upgrade"
    conn.exec_driver_sql(f"ALTER TABLE {table.name} RENAME TO {old_name}")
    # The table first and its indexes after the copy: one sort per index
    # instead of a random index update per row.
    conn.execute(sa.schema.CreateTable(table))
    columns = ", ".join(column.name for column in table.columns)
    conn.exec_driver_sql(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {old_name}")
    conn.exec_driver_sql(f"DROP TABLE {old_name}")
    for index in table.indexes:
        index.create(conn)


def _fill_feature_rollups(conn: Connection) -> None:
    sums = (
        "calls, error_calls, unpriced_calls, prompt_tokens, completion_tokens, input_tokens, "
        "cache_write_tokens, cache_read_tokens, output_tokens, cost_usd, latency_ms_sum"
    )
    summed = ", ".join(f"SUM({column})" for column in sums.split(", "))
    conn.exec_driver_sql(
        f"INSERT INTO cost_daily_feature (day, provider, model, feature, {sums}) "
        f"SELECT day, provider, model, feature, {summed} FROM cost_daily GROUP BY day, provider, model, feature"
    )


def _add_missing_indexes(conn: Connection, table: sa.Table, inspector: Any) -> None:
    present = {index["name"] for index in inspector.get_indexes(table.name)}
    for index in table.indexes:
        if index.name not in present:
            index.create(conn)


def _adopt_plain_log(conn: Connection) -> None:
    """Fill the columns a plain cost logger did not have, and normalise its timestamps."""
    key = "'legacy-' || CAST(id AS TEXT)" if conn.dialect.name == "sqlite" else "'legacy-' || id::text"
    conn.exec_driver_sql(f"UPDATE cost_events SET event_id = {key} WHERE event_id IS NULL")
    if conn.dialect.name == "sqlite":
        # ISO text with a "T" and an offset compares wrongly against
        # datetime('now', ...); store the space-separated UTC form instead.
        conn.exec_driver_sql(
            "UPDATE cost_events SET ts = strftime('%Y-%m-%d %H:%M:%f', ts) "
            "WHERE ts LIKE '%T%' OR ts LIKE '%+%' OR ts LIKE '%Z'"
        )
        conn.exec_driver_sql("UPDATE cost_events SET unpriced = 1 WHERE cost_usd IS NULL")
    else:
        conn.exec_driver_sql("UPDATE cost_events SET unpriced = TRUE WHERE cost_usd IS NULL")
