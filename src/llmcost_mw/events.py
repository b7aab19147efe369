"""The cost event: one row of `cost_events`, built once per billable call."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from .store import INSERT_COLUMNS, cost_events, ts_text
from .usage import Usage

__all__ = ["CostEvent", "Status", "utcnow"]

logger = logging.getLogger(__name__)


class Status:
    """Values of the `status` column."""

    OK = "ok"
    ERROR = "error"
    # A stream that the caller closed early or that the server cut.
    INCOMPLETE = "incomplete"
    # A stream that was closed before its first event was read.
    NOT_CONSUMED = "not_consumed"


def _new_event_id() -> str:
    # 32 hex digits: the nanosecond clock, then 64 random bits. New ids sort
    # after old ones, so inserts append to the unique index instead of
    # landing on a random page of it. The `random` module, unlike
    # os.urandom, makes no system call on the caller's thread, and Python
    # reseeds it in a forked child.
    return f"{time.time_ns():016x}{random.getrandbits(64):016x}"


def utcnow() -> datetime:
    """Return the current UTC time as a naive datetime, the form stored in `ts`."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(slots=True)
class CostEvent:
    """Everything recorded about one billable call."""

    provider: str
    model: str
    usage: Usage
    status: str = Status.OK
    ts: datetime = field(default_factory=utcnow)
    feature: str | None = None
    user_id: str | None = None
    request_id: str | None = None
    response_id: str | None = None
    request_model: str | None = None
    error_type: str | None = None
    cost_usd: Decimal | None = None
    unpriced: bool = False
    price_version: str | None = None
    price_id: str | None = None
    batch: bool = False
    latency_ms: float = 0.0
    context_missing: bool = False
    flags: frozenset[str] = frozenset()
    event_id: str = field(default_factory=_new_event_id)
    # Set by the tracker to price and count this event (and any other
    # pending one) before its row is built, off the caller's thread.
    prepare: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    # Set by a provider hook to parse the response's usage off the caller's
    # thread. Until `resolve_usage()` runs, `usage` has empty buckets.
    usage_source: Callable[[], Usage] | None = field(default=None, repr=False, compare=False)

    def resolve_usage(self) -> None:
        """Parse the usage that `usage_source` reads, once.

        When parsing raises, the row keeps empty buckets, is flagged
        `usage_invalid` and a warning is logged, because the caller's call
        has already succeeded.
        """
        parse, self.usage_source = self.usage_source, None
        if parse is None:
            return
        try:
            self.usage = parse()
        except Exception as exc:  # a broken usage object must not cost the row
            logger.warning(
                "invalid usage in %s response %s (model %s): %s; its row is flagged usage_invalid",
                self.provider,
                self.response_id,
                self.request_model,
                exc,
            )
            self.flags = self.flags | {"usage_invalid"}

    def to_row(self) -> dict[str, Any]:
        """Flatten into a dict of the column values of `cost_events`; see `values`."""
        return dict(zip(INSERT_COLUMNS, self.values(), strict=True))

    def values(self, *, ts_as_text: bool = False) -> tuple[Any, ...]:
        """Flatten into the inserted values of `cost_events`, in `INSERT_COLUMNS` order.

        `ts_as_text` gives `ts` in the text form that SQLite stores. Text
        that does not fit its column is cut and the row flagged
        `value_truncated`, and NUL characters are removed: PostgreSQL rejects
        both, and one such value (a long `x-request-id` header sent by any
        client) would otherwise fail its whole batch.
        """
        if self.prepare is not None:
            self.prepare()
        if self.usage_source is not None:
            self.resolve_usage()
        usage = self.usage
        flags = self.flags | usage.flags
        texts = []
        for name, value in (
            ("model", self.model),
            ("request_model", self.request_model),
            ("feature", self.feature),
            ("user_id", self.user_id),
            ("request_id", self.request_id),
            ("response_id", self.response_id),
            ("error_type", self.error_type),
            ("service_tier", usage.service_tier or ("batch" if self.batch else None)),
        ):
            if value is not None:
                fitted = _fit(value, _TEXT_LIMITS[name])
                if fitted is not value:
                    value = fitted
                    flags = flags | {"value_truncated"}
            texts.append(value)
        model, request_model, feature, user_id, request_id, response_id, error_type, service_tier = texts
        ts = self.ts
        if ts.tzinfo is not None:
            # `ts` columns hold naive UTC. PostgreSQL would convert an aware
            # value to the session's time zone, which need not be UTC.
            ts = ts.astimezone(UTC).replace(tzinfo=None)
        # A tuple built in one expression, not a dict: this runs once per
        # event on the writer thread, which shares the GIL with the app.
        return (
            self.event_id,
            ts_text(ts) if ts_as_text else ts,
            self.provider,
            model,
            request_model,
            feature,
            user_id,
            request_id,
            response_id,
            self.status,
            error_type,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.input_tokens,
            usage.cache_write_5m_tokens,
            usage.cache_write_1h_tokens,
            usage.cache_read_tokens,
            usage.output_tokens,
            usage.reasoning_tokens,
            usage.web_search_requests,
            usage.web_fetch_requests,
            float(self.cost_usd) if self.cost_usd is not None else None,
            self.unpriced,
            self.price_version,
            self.price_id,
            service_tier,
            round(self.latency_ms, 3),
            self.context_missing,
            ",".join(sorted(flags)) or None,
        )


# Caller-controlled text columns and their sizes in `cost_events`.
_TEXT_LIMITS = {
    name: cost_events.c[name].type.length
    for name in (
        "model",
        "request_model",
        "feature",
        "user_id",
        "request_id",
        "response_id",
        "error_type",
        "service_tier",
    )
}


def _fit(value: Any, limit: int) -> str:
    """Return `value` as text that the store accepts, cut to `limit` characters; the same object if it fits.

    A value that is not a string (a number where an API sent one) is
    converted with `str`. NUL characters are removed, and lone surrogates
    (which UTF-8 cannot encode, so no driver can bind them) are replaced.
    """
    if not isinstance(value, str):
        value = str(value)
    elif value.isascii():
        if "\x00" not in value and len(value) <= limit:
            return value
    elif _encodes(value) and "\x00" not in value and len(value) <= limit:
        return value
    if not value.isascii() and not _encodes(value):
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "")[:limit]


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
