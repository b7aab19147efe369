"""Token usage split into the buckets that providers bill at different rates."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["Usage", "usage_from_anthropic", "usage_from_openai", "merge_anthropic_delta"]


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
    # `usage.speed` ("standard" or "fast") and `usage.inference_geo` (such as
    # "us"), which select fast-mode prices and the US-only inference multiplier.
    speed: str | None = None
    inference_geo: str | None = None
    # The share of the buckets above that came from `compaction` iterations.
    # It is kept apart so that a streamed `message_delta`, whose top-level
    # fields exclude it, can replace the top-level values without losing it.
    compaction: Usage | None = None
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


# Buckets that a compaction iteration reports and that are summed into the totals.
_COMPACTION_BUCKETS = (
    "input_tokens",
    "cache_write_5m_tokens",
    "cache_write_1h_tokens",
    "cache_read_tokens",
    "output_tokens",
)


def _get(source: Any, name: str) -> Any:
    if source is None:
        return None
    if isinstance(source, dict):
        return source.get(name)
    # The SDK's pydantic models keep fields in `__dict__` and unknown fields
    # in `__pydantic_extra__`. Reading both directly skips pydantic's
    # `__getattr__`, which raises AttributeError for an absent field: a few
    # microseconds per miss in a local timeit run, on every call.
    fields = getattr(source, "__dict__", None)
    if fields is not None and name in fields:
        return fields[name]
    extra = getattr(source, "__pydantic_extra__", None)
    if isinstance(extra, dict):
        return extra.get(name)
    if isinstance(source, Mapping):
        return source.get(name)
    return getattr(source, name, None)


def _reader(source: Any) -> Callable[[str], Any]:
    """Return a function that reads one field of `source`, like `_get` but cheaper per field.

    For a dict or a pydantic model without unknown fields, it is a bound
    `dict.get`, with no Python frame per field.
    """
    if isinstance(source, dict):
        return source.get
    if isinstance(source, str | bytes | int | float | list | tuple):
        # Every field would read as missing, giving empty buckets and $0.
        raise TypeError(f"invalid usage {source!r}: expected an object or a JSON object")
    fields = getattr(source, "__dict__", None)
    extra = getattr(source, "__pydantic_extra__", None)
    if fields is not None and extra == {}:
        return fields.get
    return functools.partial(_get, source)


# The largest count the store's 32-bit integer columns hold; no real call
# comes near it, so a larger one is a broken usage object.
_MAX_COUNT = 2**31 - 1


def _count(value: Any) -> int:
    """Return a token or request count; raise ValueError for anything that is not a whole number in range."""
    if value is None:
        return 0
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        # int() would read true as 1 and 3.7 as 3.
        raise ValueError(f"invalid token count {value!r}: use a whole number")
    try:
        count = int(value)
    except OverflowError as exc:  # int(float("inf"))
        raise ValueError(f"invalid token count {value!r}: use a finite number") from exc
    if not 0 <= count <= _MAX_COUNT:
        raise ValueError(f"invalid token count {value!r}: counts are from 0 to {_MAX_COUNT}")
    return count


def _cache_writes(get: Callable[[str], Any], flags: set[str]) -> tuple[int, int]:
    """Split the cache writes of the usage that `get` reads into 5-minute and 1-hour tokens.

    Without a `cache_creation` breakdown that adds up, every write is taken
    as a 5-minute write (the cheaper rate), and `cache_ttl_unknown` or
    `cache_breakdown_mismatch` is added to `flags`.
    """
    cache_write_total = _count(get("cache_creation_input_tokens"))
    breakdown = get("cache_creation")
    write_5m = _count(_get(breakdown, "ephemeral_5m_input_tokens"))
    write_1h = _count(_get(breakdown, "ephemeral_1h_input_tokens"))
    if breakdown is not None and write_5m + write_1h == cache_write_total:
        return write_5m, write_1h
    if cache_write_total and breakdown is not None:
        flags.add("cache_breakdown_mismatch")
    elif cache_write_total:
        flags.add("cache_ttl_unknown")
    return cache_write_total, 0


def usage_from_anthropic(usage: Any) -> Usage:
    """Normalise an Anthropic `Usage` or `BetaUsage` object, or its JSON dict, into buckets.

    The `cache_creation` breakdown gives the 5-minute and 1-hour cache writes.
    When it is missing, all writes are taken as 5-minute writes (the cheaper
    rate) and the row is flagged `cache_ttl_unknown`. Tokens of `compaction`
    iterations are added to the buckets, because the API leaves them out of
    the top-level fields although they are billed.
    """
    get = _reader(usage)
    flags: set[str] = set()
    write_5m, write_1h = _cache_writes(get, flags)
    server_tools = get("server_tool_use")
    details = get("output_tokens_details")
    tier = get("service_tier")
    speed = get("speed")
    geo = get("inference_geo")
    if speed is not None:
        speed = str(speed)
        if speed == "fast":
            flags.add("fast_mode")
    if geo is not None:
        geo = str(geo)
        if geo == "us":
            flags.add("inference_geo_us")
    top_level = Usage(
        input_tokens=_count(get("input_tokens")),
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        cache_read_tokens=_count(get("cache_read_input_tokens")),
        output_tokens=_count(get("output_tokens")),
        reasoning_tokens=_count(_get(details, "thinking_tokens")),
        web_search_requests=_count(_get(server_tools, "web_search_requests")),
        web_fetch_requests=_count(_get(server_tools, "web_fetch_requests")),
        service_tier=str(tier) if tier is not None else None,
        speed=speed,
        inference_geo=geo,
        flags=frozenset(flags),
    )
    return _with_compaction(top_level, _compaction_usage(get("iterations")))


def _compaction_usage(iterations: Any) -> Usage | None:
    """Sum the buckets of the `compaction` entries of `usage.iterations`, or None when there are none.

    Other entry types are ignored: `message` entries are already inside the
    top-level fields.
    """
    # NOTE: `advisor_message` and `fallback_message` entries are ignored too.
    # The SDK (anthropic 2.17.0) documents only compaction tokens as missing
    # from the top-level fields, and advisor tokens come from another model
    # whose price this row cannot name.
    if not iterations:
        return None
    entries = [entry for entry in iterations if _get(entry, "type") == "compaction"]
    if not entries:
        return None
    flags: set[str] = set()
    writes = [_cache_writes(_reader(entry), flags) for entry in entries]
    return Usage(
        input_tokens=sum(_count(_get(entry, "input_tokens")) for entry in entries),
        cache_write_5m_tokens=sum(write_5m for write_5m, _write_1h in writes),
        cache_write_1h_tokens=sum(write_1h for _write_5m, write_1h in writes),
        cache_read_tokens=sum(_count(_get(entry, "cache_read_input_tokens")) for entry in entries),
        output_tokens=sum(_count(_get(entry, "output_tokens")) for entry in entries),
        flags=frozenset(flags),
    )


def _with_compaction(top_level: Usage, compaction: Usage | None) -> Usage:
    """Add the compaction buckets to top-level usage that does not include them yet."""
    if compaction is None:
        return top_level
    summed = {name: getattr(top_level, name) + getattr(compaction, name) for name in _COMPACTION_BUCKETS}
    flags = top_level.flags | compaction.flags | {"compaction"}
    return replace(top_level, **summed, compaction=compaction, flags=flags)


def _without_compaction(usage: Usage) -> Usage:
    """Return the top-level part of usage built by `_with_compaction`."""
    compaction = usage.compaction
    if compaction is None:
        return usage
    remaining = {name: getattr(usage, name) - getattr(compaction, name) for name in _COMPACTION_BUCKETS}
    return replace(usage, **remaining, compaction=None, flags=usage.flags - {"compaction"})


def merge_anthropic_delta(start: Usage, delta: Any) -> Usage:
    """Apply a streamed `message_delta` usage to the usage from `message_start`.

    Delta values are cumulative totals, so each field that is present replaces
    the earlier value; nothing is added. The delta carries no TTL split of the
    cache writes, so a changed write total keeps the start's split only when
    it still adds up. Compaction tokens are kept apart while the top-level
    fields are replaced, then added back: from the delta's `iterations` when
    it has them, else from the start.
    """
    base = _without_compaction(start)
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
    if writes is not None and _count(writes) != base.cache_write_tokens:
        changes["cache_write_5m_tokens"] = _count(writes)
        changes["cache_write_1h_tokens"] = 0
        changes["flags"] = base.flags | {"cache_ttl_unknown"}
    details = _get(delta, "output_tokens_details")
    if details is not None:
        changes["reasoning_tokens"] = _count(_get(details, "thinking_tokens"))
    server_tools = _get(delta, "server_tool_use")
    if server_tools is not None:
        changes["web_search_requests"] = _count(_get(server_tools, "web_search_requests"))
        changes["web_fetch_requests"] = _count(_get(server_tools, "web_fetch_requests"))
    merged = replace(base, **changes) if changes else base

    iterations = _get(delta, "iterations")
    compaction = _compaction_usage(iterations) if iterations is not None else start.compaction
    return _with_compaction(merged, compaction)


def usage_from_openai(usage: Any) -> Usage:
    """Normalise an OpenAI usage object, or its JSON dict, into disjoint buckets.

    Accepts the chat and legacy completions `CompletionUsage`, the Responses
    API `ResponseUsage` and the embeddings usage. OpenAI counts cached and
    cache-write tokens inside the prompt (or input) total and reasoning
    tokens inside the completion (or output) total, so the uncached input is
    the remainder, output keeps the reasoning tokens, and `reasoning_tokens`
    only reports their share. Raises ValueError when a count is negative or
    the cached tokens exceed the prompt.
    """
    get = _reader(usage)
    prompt = get("prompt_tokens")
    if prompt is not None or get("completion_tokens") is not None:
        # Chat completions, legacy completions and embeddings.
        input_details = get("prompt_tokens_details")
        output_details = get("completion_tokens_details")
        output = _count(get("completion_tokens"))
    else:
        # The Responses API.
        prompt = get("input_tokens")
        if prompt is None and get("output_tokens") is None:
            # Read as zero tokens, such a usage would price the call at $0.
            raise ValueError(
                "invalid usage: it has none of prompt_tokens, completion_tokens, input_tokens, output_tokens"
            )
        input_details = get("input_tokens_details")
        output_details = get("output_tokens_details")
        output = _count(get("output_tokens"))
    prompt_tokens = _count(prompt)
    cached = _count(_get(input_details, "cached_tokens"))
    cache_writes = _count(_get(input_details, "cache_write_tokens"))
    uncached = prompt_tokens - cached - cache_writes
    if uncached < 0:
        raise ValueError(
            f"invalid usage: {cached} cached and {cache_writes} cache-write tokens "
            f"exceed the {prompt_tokens} prompt tokens"
        )
    # NOTE: no page read gave an OpenAI cache-write rate, and cache writes are
    # reported without a lifetime that matches the 5-minute or 1-hour
    # buckets. All of them go to the 5-minute bucket, which OpenAI price rows
    # price at the input rate.
    return Usage(
        input_tokens=uncached,
        cache_write_5m_tokens=cache_writes,
        cache_read_tokens=cached,
        output_tokens=output,
        reasoning_tokens=_count(_get(output_details, "reasoning_tokens")),
    )
