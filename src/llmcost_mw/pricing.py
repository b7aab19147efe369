"""The owned price table and the cost of one call.

Prices live in `data/prices.toml` as decimal strings in USD per million
tokens, each row with the URL it was taken from and the date it was checked.
Costs are computed with `Decimal`, so a sum of buckets is exact before it is
stored.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PriceTableError
from .usage import Usage

__all__ = ["BucketRates", "ModelPrice", "PriceBook", "Quote", "normalize_model_id"]

MILLION = Decimal(1_000_000)

_BUCKETS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")

# Platform forms of one first-party id. Bedrock: an optional inference-profile
# region ("us.", "global.") then "anthropic." and a "-v1:0" style version.
# Vertex: "name@date".
_BEDROCK_REGION = re.compile(r"^(us|eu|apac|global|jp|au|us-gov|ca)\.(?=anthropic\.)")
_BEDROCK_VENDOR = re.compile(r"^anthropic\.")
_BEDROCK_VERSION = re.compile(r"-v\d+(:\d+)?$")
_DATE_SUFFIX = re.compile(r"-(\d{8})$")
_ARN_MODEL = re.compile(r"^arn:aws[\w-]*:bedrock:[^:]*:[^:]*:(?:[\w-]+)/(.+)$")


@dataclass(frozen=True, slots=True)
class BucketRates:
    """USD per million tokens for each token bucket."""

    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One row of the price table."""

    id: str
    aliases: tuple[str, ...]
    provider: str
    rates: BucketRates
    source: str
    checked: str
    long_context_threshold: int | None = None
    long_context_rates: BucketRates | None = None
    retired: str | None = None


@dataclass(frozen=True, slots=True)
class Quote:
    """The priced result of one call: the cost, and which table row and tier priced it."""

    cost_usd: Decimal
    price_id: str
    long_context: bool
    batch: bool


def normalize_model_id(model: str) -> str:
    """Map a Bedrock or Vertex model id to its first-party form.

    `us.anthropic.claude-3-5-haiku-20241022-v1:0` and
    `claude-3-5-haiku@20241022` both become `claude-3-5-haiku-20241022`.
    An inference-profile ARN is reduced to the profile id first.
    """
    name = model.strip()
    arn = _ARN_MODEL.match(name)
    if arn:
        name = arn.group(1)
    name = _BEDROCK_REGION.sub("", name)
    if _BEDROCK_VENDOR.match(name):
        name = _BEDROCK_VERSION.sub("", _BEDROCK_VENDOR.sub("", name))
    return name.replace("@", "-")


class PriceBook:
    """Looks up the price row of a model id and prices usage with it."""

    def __init__(
        self,
        models: list[ModelPrice],
        *,
        version: str,
        batch_discount: Decimal = Decimal("0.5"),
        web_search_usd: Decimal = Decimal(0),
        web_fetch_usd: Decimal = Decimal(0),
    ) -> None:
        self.models = tuple(models)
        self.version = version
        self.batch_discount = batch_discount
        self.web_search_usd = web_search_usd
        self.web_fetch_usd = web_fetch_usd
        self._by_id: dict[str, ModelPrice] = {}
        for row in models:
            for name in (row.id, *row.aliases):
                if name in self._by_id:
                    raise PriceTableError(
                        f"model id {name!r} appears in two price rows; keep it on one row only"
                    )
                self._by_id[name] = row
        self._cache: dict[str, ModelPrice | None] = {}

    @classmethod
    def load(cls, path: str | Path | None = None) -> PriceBook:
        """Load a price table file; without a path, the one shipped in the package."""
        if path is None:
            text = resources.files("llmcost_mw").joinpath("data/prices.toml").read_text("utf-8")
            origin = "the bundled price table"
        else:
            text = Path(path).read_text("utf-8")
            origin = str(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PriceTableError(f"{origin} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, origin=origin)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "price table") -> PriceBook:
        version = data.get("version")
        if not isinstance(version, str) or not version:
            raise PriceTableError(f"{origin} has no `version` string; add e.g. version = \"2026-12-04\"")
        models = [_parse_model(entry, origin) for entry in data.get("models", [])]
        batch = data.get("batch", {})
        tools = data.get("server_tools", {})
        return cls(
            models,
            version=version,
            batch_discount=_decimal(batch.get("discount", "0.5"), f"{origin} [batch] discount"),
            web_search_usd=_decimal(tools.get("web_search", "0"), f"{origin} [server_tools] web_search"),
            web_fetch_usd=_decimal(tools.get("web_fetch", "0"), f"{origin} [server_tools] web_fetch"),
        )

    def lookup(self, model: str) -> ModelPrice | None:
        """Return the row for a model id, or None when the table does not list it.

        Tries the exact id, then its first-party form (Bedrock and Vertex ids),
        then that form without its date suffix. It never falls back to a
        prefix, so an unknown version is unpriced rather than priced as its
        nearest relative.
        """
        try:
            return self._cache[model]
        except KeyError:
            pass
        row = self._by_id.get(model)
        if row is None:
            normalized = normalize_model_id(model)
            row = self._by_id.get(normalized)
            if row is None:
                undated = _DATE_SUFFIX.sub("", normalized)
                if undated != normalized:
                    row = self._by_id.get(undated)
        # Bounded so that a client sending junk model ids cannot grow memory.
        if len(self._cache) < 10_000:
            self._cache[model] = row
        return row

    def quote(self, model: str, usage: Usage, *, batch: bool = False) -> Quote | None:
        """Price one call, or return None when the model is not in the table."""
        row = self.lookup(model)
        if row is None:
            return None
        rates = row.rates
        long_context = False
        if row.long_context_rates is not None and row.long_context_threshold is not None:
            # The tier applies to the whole request once the prompt, cache
            # reads and writes included, crosses the threshold.
            if usage.prompt_tokens > row.long_context_threshold:
                rates = row.long_context_rates
                long_context = True
        tokens_usd = (
            usage.input_tokens * rates.input
            + usage.cache_write_5m_tokens * rates.cache_write_5m
            + usage.cache_write_1h_tokens * rates.cache_write_1h
            + usage.cache_read_tokens * rates.cache_read
            + usage.output_tokens * rates.output
        ) / MILLION
        if batch:
            tokens_usd *= self.batch_discount
        tools_usd = usage.web_search_requests * self.web_search_usd + usage.web_fetch_requests * self.web_fetch_usd
        return Quote(cost_usd=tokens_usd + tools_usd, price_id=row.id, long_context=long_context, batch=batch)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, float):
        raise PriceTableError(f"{where} = {value!r} is a float; write prices as strings, e.g. \"3.75\"")
    try:
        number = Decimal(str(value))
    except (InvalidOperation, ValueError) as exc:
        raise PriceTableError(f"{where} = {value!r} is not a decimal number") from exc
    if not number.is_finite() or number < 0:
        raise PriceTableError(f"{where} = {value!r} must be a finite number of USD, zero or more")
    return number


def _rates(entry: dict[str, Any], where: str) -> BucketRates:
    missing = [bucket for bucket in _BUCKETS if bucket not in entry]
    if missing:
        raise PriceTableError(f"{where} lacks the price of {', '.join(missing)}; every bucket needs a price")
    return BucketRates(**{bucket: _decimal(entry[bucket], f"{where} {bucket}") for bucket in _BUCKETS})


def _parse_model(entry: dict[str, Any], origin: str) -> ModelPrice:
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise PriceTableError(f"a [[models]] row in {origin} has no `id`")
    where = f"{origin} model {model_id!r}"
    for key in ("source", "checked"):
        if not str(entry.get(key) or "").strip():
            raise PriceTableError(f"{where} has no `{key}`; every price needs its source URL and check date")
    long_context = entry.get("long_context")
    threshold = None
    long_rates = None
    if long_context is not None:
        threshold = long_context.get("threshold_tokens")
        if not isinstance(threshold, int) or threshold <= 0:
            raise PriceTableError(f"{where} long_context.threshold_tokens must be a positive integer")
        long_rates = _rates(long_context, f"{where} long_context")
    return ModelPrice(
        id=model_id,
        aliases=tuple(entry.get("aliases", ())),
        provider=str(entry.get("provider", "anthropic")),
        rates=_rates(entry, where),
        source=str(entry["source"]),
        checked=str(entry["checked"]),
        long_context_threshold=threshold,
        long_context_rates=long_rates,
        retired=str(entry["retired"]) if entry.get("retired") else None,
    )
