"""The owned price table and the cost of one call.

Prices live in `data/prices.toml` as decimal strings in USD per million
tokens, each row with the URL it was taken from and the date it was checked.
Costs are computed with `Decimal`, so a sum of buckets is exact before it is
stored.
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PriceTableError
from .usage import Usage

__all__ = ["BucketRates", "ModelPrice", "PriceBook", "Quote", "TableSource", "normalize_model_id"]

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)

_BUCKETS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")

# Platform forms of one first-party id. Bedrock: an optional inference-profile
# region ("us.", "global.") then "anthropic." and a "-v1:0" style version.
# Vertex: "name@date".
_BEDROCK_REGION = re.compile(r"^(us|eu|apac|global|jp|au|us-gov|ca)\.(?=anthropic\.)")
_BEDROCK_VENDOR = re.compile(r"^anthropic\.")
# "-v1:0", "-v1", and the context-window variants such as "-v1:0:200k".
_BEDROCK_VERSION = re.compile(r"-v\d+(:\d+)?(:\d+k)?$")
# Anthropic snapshot dates are "-20250929", OpenAI ones "-2024-08-06".
_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2})$")
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
    # Rates that replace `rates` for a fast-mode request (`usage.speed == "fast"`).
    fast_mode_rates: BucketRates | None = None
    fast_mode_source: str | None = None
    fast_mode_checked: str | None = None
    retired: str | None = None


@dataclass(frozen=True, slots=True)
class TableSource:
    """The page a table-wide value (batch discount, server tool fees, US-only multiplier) was read from."""

    source: str | None
    checked: str | None


@dataclass(frozen=True, slots=True)
class Quote:
    """The priced result of one call: the cost, and which table row and tier priced it."""

    cost_usd: Decimal
    price_id: str
    long_context: bool
    batch: bool
    fast_mode: bool = False
    inference_geo_multiplier: Decimal | None = None


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
        us_geo_multiplier: Decimal = Decimal(1),
        us_geo_models: frozenset[str] = frozenset(),
        table_sources: dict[str, TableSource] | None = None,
    ) -> None:
        self.models = tuple(models)
        self.version = version
        self.batch_discount = batch_discount
        self.web_search_usd = web_search_usd
        self.web_fetch_usd = web_fetch_usd
        self.us_geo_multiplier = us_geo_multiplier
        self.us_geo_models = us_geo_models
        # Source and check date of the [batch], [server_tools] and
        # [inference_geo] tables, keyed by table name.
        self.table_sources = dict(table_sources or {})

        self._by_id: dict[str, ModelPrice] = {}
        self._by_alias: dict[str, ModelPrice] = {}
        for row in models:
            for name in (row.id, *row.aliases):
                if name in self._by_id or name in self._by_alias:
                    raise PriceTableError(
                        f"model id {name!r} appears in two price rows; keep it on one row only"
                    )
                if name == row.id:
                    self._by_id[name] = row
                else:
                    self._by_alias[name] = row

        unknown_geo = sorted(us_geo_models - self._by_id.keys())
        if unknown_geo:
            raise PriceTableError(
                f"[inference_geo] models names {', '.join(unknown_geo)}, but no [[models]] row has that id; "
                "list the `id` of a price row, not an alias"
            )

        self._cache: dict[str, ModelPrice | None] = {}
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path | None = None) -> PriceBook:
        """Load a price table file; without a path, the one shipped in the package."""
        if path is None:
            text = resources.files("llmcost_mw").joinpath("data/prices.toml").read_text("utf-8")
            origin = "the bundled price table"
        else:
            origin = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise PriceTableError(
                    f"cannot read the price table {origin}: {exc}; pass the path of a readable TOML file"
                ) from exc
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
        geo = data.get("inference_geo", {})
        geo_models = geo.get("models", [])
        if not isinstance(geo_models, list) or not all(isinstance(name, str) for name in geo_models):
            raise PriceTableError(f"{origin} [inference_geo] models must be a list of model id strings")
        sources = {
            name: TableSource(_optional_text(table.get("source")), _optional_text(table.get("checked")))
            for name, table in (("batch", batch), ("server_tools", tools), ("inference_geo", geo))
            if table
        }
        return cls(
            models,
            version=version,
            batch_discount=_decimal(batch.get("discount", "0.5"), f"{origin} [batch] discount"),
            web_search_usd=_decimal(tools.get("web_search", "0"), f"{origin} [server_tools] web_search"),
            web_fetch_usd=_decimal(tools.get("web_fetch", "0"), f"{origin} [server_tools] web_fetch"),
            us_geo_multiplier=_decimal(
                geo.get("us_multiplier", "1"), f"{origin} [inference_geo] us_multiplier"
            ),
            us_geo_models=frozenset(geo_models),
            table_sources=sources,
        )

    def lookup(self, model: str) -> ModelPrice | None:
        """Return the row for a model id, or None when the table does not list it.

        Bedrock and Vertex ids are first reduced to their first-party form.
        Then the row ids are tried with the exact id and with the id without
        its date suffix (`-20250929` or `-2024-08-06`), then the aliases in
        the same order. It never falls
        back to a prefix, so an unknown version is unpriced rather than priced
        as its nearest relative.
        """
        if not isinstance(model, str):
            model = str(model)
        try:
            return self._cache[model]
        except KeyError:
            pass
        candidates = [model]
        normalized = normalize_model_id(model)
        if normalized != model:
            candidates.append(normalized)
        undated = _DATE_SUFFIX.sub("", normalized)
        if undated != normalized:
            candidates.append(undated)
        row = None
        for names in (self._by_id, self._by_alias):
            row = next((names[name] for name in candidates if name in names), None)
            if row is not None:
                break
        # Bounded so that a client sending junk model ids cannot grow memory.
        if len(self._cache) < 10_000:
            self._cache[model] = row
        return row

    def quote(self, model: str, usage: Usage, *, batch: bool = False) -> Quote | None:
        """Price one call, or return None when the table has no price for it.

        None means the model is not in the table, or the call ran in fast mode
        and its row has no fast-mode prices. Fast-mode calls are never priced
        at the standard rates, which would understate them.
        """
        row = self.lookup(model)
        if row is None:
            return None
        rates = row.rates
        long_context = False
        if row.long_context_rates is not None and row.long_context_threshold is not None:
            # The tier applies to the whole request once the prompt, cache
            # reads and writes included, crosses the threshold. Compaction
            # iterations are separate server-side requests, so they do not
            # count toward it.
            prompt = usage.prompt_tokens
            if usage.compaction is not None:
                prompt -= usage.compaction.prompt_tokens
            if prompt > row.long_context_threshold:
                rates = row.long_context_rates
                long_context = True
        fast_mode = usage.speed == "fast"
        if fast_mode:
            if row.fast_mode_rates is None:
                self._warn_once(
                    f"fast:{row.id}",
                    "model %r ran in fast mode, but its price row %r has no [models.fast_mode] prices; "
                    "its fast calls are recorded with cost_usd NULL and unpriced = true until they are added",
                    model,
                    row.id,
                )
                return None
            if long_context:
                # No page read gives fast-mode prices above a long-context
                # threshold, and guessing how the two combine could be wrong.
                self._warn_once(
                    f"fast-long:{row.id}",
                    "model %r ran in fast mode above its long-context threshold of %d prompt tokens, which "
                    "the price table does not price; such calls are recorded with cost_usd NULL",
                    model,
                    row.long_context_threshold,
                )
                return None
            rates = row.fast_mode_rates
        tokens_usd = (
            usage.input_tokens * rates.input
            + usage.cache_write_5m_tokens * rates.cache_write_5m
            + usage.cache_write_1h_tokens * rates.cache_write_1h
            + usage.cache_read_tokens * rates.cache_read
            + usage.output_tokens * rates.output
        ) / MILLION
        geo_multiplier = None
        if usage.inference_geo == "us" and row.id in self.us_geo_models:
            geo_multiplier = self.us_geo_multiplier
            tokens_usd *= geo_multiplier
        if batch:
            tokens_usd *= self.batch_discount
        tools_usd = (
            usage.web_search_requests * self.web_search_usd + usage.web_fetch_requests * self.web_fetch_usd
        )
        return Quote(
            cost_usd=tokens_usd + tools_usd,
            price_id=row.id,
            long_context=long_context,
            batch=batch,
            fast_mode=fast_mode,
            inference_geo_multiplier=geo_multiplier,
        )

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        with self._warn_lock:
            # Bounded like the lookup cache.
            if key in self._warned or len(self._warned) >= 1_000:
                return
            self._warned.add(key)
        logger.warning(message, *args)


def _aliases(value: Any, where: str) -> tuple[str, ...]:
    # A bare string would otherwise become one alias per character.
    if not isinstance(value, list) or not all(isinstance(alias, str) and alias for alias in value):
        raise PriceTableError(f"{where} aliases = {value!r} must be a list of model ids, e.g. [\"claude-x-1\"]")
    return tuple(value)


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


def _optional_text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _require_source(entry: dict[str, Any], where: str) -> None:
    for key in ("source", "checked"):
        if not str(entry.get(key) or "").strip():
            raise PriceTableError(f"{where} has no `{key}`; every price needs its source URL and check date")


def _parse_model(entry: dict[str, Any], origin: str) -> ModelPrice:
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id:
        raise PriceTableError(f"a [[models]] row in {origin} has no `id`")
    where = f"{origin} model {model_id!r}"
    _require_source(entry, where)

    long_context = entry.get("long_context")
    threshold = None
    long_rates = None
    if long_context is not None:
        threshold = long_context.get("threshold_tokens")
        if not isinstance(threshold, int) or threshold <= 0:
            raise PriceTableError(f"{where} long_context.threshold_tokens must be a positive integer")
        long_rates = _rates(long_context, f"{where} long_context")

    fast_mode = entry.get("fast_mode")
    fast_rates = None
    if fast_mode is not None:
        # Fast-mode prices often come from a page other than the row's, so
        # the table carries its own source and check date.
        _require_source(fast_mode, f"{where} fast_mode")
        fast_rates = _rates(fast_mode, f"{where} fast_mode")

    return ModelPrice(
        id=model_id,
        aliases=_aliases(entry.get("aliases", []), where),
        provider=str(entry.get("provider", "anthropic")),
        rates=_rates(entry, where),
        source=str(entry["source"]),
        checked=str(entry["checked"]),
        long_context_threshold=threshold,
        long_context_rates=long_rates,
        fast_mode_rates=fast_rates,
        fast_mode_source=str(fast_mode["source"]) if fast_mode is not None else None,
        fast_mode_checked=str(fast_mode["checked"]) if fast_mode is not None else None,
        retired=str(entry["retired"]) if entry.get("retired") else None,
    )
