"""Token usage split into the buckets that providers bill at different rates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Usage", "usage_from_anthropic", "merge_anthropic_delta"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Disjoint token buckets of one call.

    `input_tokens` is uncached input only; cache writes and reads are separate
    buckets, as Anthropic reports them. `prompt_tokens` is their sum, the way
    the OpenTelemetry GenAI conventions count input.
    """

    input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    cache_read_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0
    web_fetch_requests: int = 0
    service_tier: str | None = None
    # Flags about how the numbers were derived, stored on the row.
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def cache_write_tokens(self) -> int:
        return self.cache_write_5m_tokens + self.cache_write_1h_tokens

    @property
    def prompt_tokens(self) -> int:
        return self.input_tokens + self.cache_write_tokens + self.cache_read_tokens

    @property
    def completion_tokens(self) -> int:
        return self.output_tokens


def _get(source: Any, name: str) -> Any:
    if source is None:
        return None
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _count(value: Any) -> int:
    if value is None:
        return 0
    count = int(value)
    if count < 0:
        raise ValueError(f"invalid token count {value!r}: counts are never negative")
    return count


def usage_from_anthropic(usage: Any) -> Usage:
    """Normalise an Anthropic `Usage` object, or its JSON dict, into buckets.

    The `cache_creation` breakdown gives the 5-minute and 1-hour cache writes.
    When it is missing, all writes are taken as 5-minute writes (the cheaper
    rate) and the row is flagged `cache_ttl_unknown`.
    """
    flags: set[str] = set()
    cache_write_total = _count(_get(usage, "cache_creation_input_tokens"))
    breakdown = _get(usage, "cache_creation")
    write_5m = _count(_get(breakdown, "ephemeral_5m_input_tokens"))
    write_1h = _count(_get(breakdown, "ephemeral_1h_input_tokens"))
    if breakdown is None or write_5m + write_1h != cache_write_total:
        if cache_write_total and breakdown is not None:
            flags.add("cache_breakdown_mismatch")
        elif cache_write_total:
            flags.add("cache_ttl_unknown")
        write_5m, write_1h = cache_write_total, 0

    server_tools = _get(usage, "server_tool_use")
    details = _get(usage, "output_tokens_details")
    tier = _get(usage, "service_tier")
    return Usage(
        input_tokens=_count(_get(usage, "input_tokens")),
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        cache_read_tokens=_count(_get(usage, "cache_read_input_tokens")),
        output_tokens=_count(_get(usage, "output_tokens")),
        reasoning_tokens=_count(_get(details, "thinking_tokens")),
        web_search_requests=_count(_get(server_tools, "web_search_requests")),
        web_fetch_requests=_count(_get(server_tools, "web_fetch_requests")),
        service_tier=str(tier) if tier is not None else None,
        flags=frozenset(flags),
    )


def merge_anthropic_delta(start: Usage, delta: Any) -> Usage:
    """Apply a streamed `message_delta` usage to the usage from `message_start`.

    Delta values are cumulative totals, so each field that is present replaces
    the earlier value; nothing is added. The delta carries no TTL split of the
    cache writes, so a changed write total keeps the start's split only when
    it still adds up.
    """
    changes: dict[str, Any] = {}
    output = _get(delta, "output_tokens")
    if output is not None:
        changes["output_tokens"] = _count(output)
    uncached = _get(delta, "input_tokens")
    if uncached is not None:
        changes["input_tokens"] = _count(uncached)
    reads = _get(delta, "cache_read_input_tokens")
    if reads is not None:
        changes["cache_read_tokens"] = _count(reads)
    writes = _get(delta, "cache_creation_input_tokens")
    if writes is not None and _count(writes) != start.cache_write_tokens:
        changes["cache_write_5m_tokens"] = _count(writes)
        changes["cache_write_1h_tokens"] = 0
        changes["flags"] = start.flags | {"cache_ttl_unknown"}
    details = _get(delta, "output_tokens_details")
    if details is not None:
        changes["reasoning_tokens"] = _count(_get(details, "thinking_tokens"))
    server_tools = _get(delta, "server_tool_use")
    if server_tools is not None:
        changes["web_search_requests"] = _count(_get(server_tools, "web_search_requests"))
        changes["web_fetch_requests"] = _count(_get(server_tools, "web_fetch_requests"))
    return replace(start, **changes) if changes else start
