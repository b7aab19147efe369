"""`llmcost prices`: the price table as text, and its drift against genai-prices."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from .errors import ConfigurationError
from .pricing import BucketRates, PriceBook

__all__ = ["compare_with_genai_prices", "format_price_table"]

_COLUMNS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")

# genai-prices names for our buckets, USD per million tokens.
_GENAI_FIELDS = {
    "input": "input_mtok",
    "output": "output_mtok",
    "cache_write_5m": "cache_write_mtok",
    "cache_write_1h": "cache_write_1h_mtok",
    "cache_read": "cache_read_mtok",
}


def format_price_table(book: PriceBook) -> str:
    """Render every row with its rates (USD per million tokens), source and check date.

    The table-wide values (batch multiplier, server tool fees, US-only
    inference multiplier) come first, each with its own source and check date.
    """
    lines = [f"price table version {book.version}; USD per million tokens", ""]
    lines.append(f"batch multiplier {_plain(book.batch_discount)} on every token bucket")
    lines.extend(_table_source(book, "batch"))
    lines.append(
        f"server tools: web search {_plain(book.web_search_usd)} USD per request, "
        f"web fetch {_plain(book.web_fetch_usd)} USD per request"
    )
    lines.extend(_table_source(book, "server_tools"))
    if book.us_geo_models:
        multiplier = _plain(book.us_geo_multiplier)
        lines.append(f"US-only inference (usage.inference_geo = us): every token price x{multiplier} on")
        lines.append(f"  {', '.join(sorted(book.us_geo_models))}")
        lines.extend(_table_source(book, "inference_geo"))
    lines.append("")
    for row in book.models:
        status = f" (retired {row.retired})" if row.retired else ""
        lines.append(f"{row.id}{status}")
        if row.aliases:
            lines.append(f"  aliases: {', '.join(row.aliases)}")
        lines.append(f"  {_rates_text(row.rates)}")
        if row.long_context_rates is not None:
            lines.append(
                f"  above {row.long_context_threshold} prompt tokens: {_rates_text(row.long_context_rates)}"
            )
        lines.append(f"  source: {row.source}")
        lines.append(f"  checked: {row.checked}")
        if row.fast_mode_rates is not None:
            lines.append(f"  fast mode (usage.speed = fast): {_rates_text(row.fast_mode_rates)}")
            lines.append(f"    source: {row.fast_mode_source}")
            lines.append(f"    checked: {row.fast_mode_checked}")
    return "\n".join(lines) + "\n"


def _rates_text(rates: BucketRates) -> str:
    return " ".join(f"{name}={_plain(getattr(rates, name))}" for name in _COLUMNS)


def _table_source(book: PriceBook, table: str) -> list[str]:
    where = book.table_sources.get(table)
    if where is None:
        return ["  source: (none)", "  checked: (none)"]
    return [f"  source: {where.source or '(none)'}", f"  checked: {where.checked or '(none)'}"]


def compare_with_genai_prices(book: PriceBook) -> tuple[str, int]:
    """List the models whose base prices differ from the genai-prices package.

    Returns the text and the number of models that differ. Models that
    genai-prices does not know are listed apart, not counted as drift.
    """
    try:
        import genai_prices
    except ImportError as exc:
        raise ConfigurationError(
            "`llmcost prices --compare` needs the genai-prices package: pip install 'llmcost-mw[compare]'"
        ) from exc

    differing: list[str] = []
    unknown: list[str] = []
    for row in book.models:
        theirs = _genai_rates(genai_prices, row.id, row.provider)
        if theirs is None:
            unknown.append(row.id)
            continue
        changes = [
            f"{name} ours={_plain(getattr(row.rates, name))} genai-prices={_plain(value)}"
            for name, value in theirs.items()
            if value is not None and value != getattr(row.rates, name)
        ]
        if changes:
            differing.append(f"{row.id}: " + "; ".join(changes))

    version = getattr(genai_prices, "__version__", "unknown")
    lines = [f"compared {len(book.models)} models with genai-prices {version}"]
    lines.append(f"{len(differing)} differ:" if differing else "no prices differ")
    lines.extend(f"  {line}" for line in differing)
    if unknown:
        lines.append(f"not in genai-prices: {', '.join(unknown)}")
    return "\n".join(lines) + "\n", len(differing)


def _genai_rates(genai_prices: Any, model_id: str, provider: str) -> dict[str, Decimal | None] | None:
    try:
        calculation = genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1, output_tokens=1), model_id, provider_id=provider
        )
    except LookupError:
        return None
    prices = calculation.model_price
    rates: dict[str, Decimal | None] = {}
    for ours, theirs in _GENAI_FIELDS.items():
        value = getattr(prices, theirs, None)
        # A tiered price starts at its base rate, the one compared here.
        rates[ours] = getattr(value, "base", value)
    return rates


def _plain(value: Decimal | BucketRates | None) -> str:
    if not isinstance(value, Decimal):
        return str(value)
    text = format(value.normalize(), "f")
    return text
