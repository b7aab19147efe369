"""Prices of token buckets, model id resolution and price table validation."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from importlib import resources

import pytest

from llmcost_mw.errors import PriceTableError
from llmcost_mw.pricing import PriceBook, normalize_model_id
from llmcost_mw.usage import Usage, usage_from_anthropic

SONNET_4 = "claude-sonnet-4-20250514"
HAIKU_3_5 = "claude-3-5-haiku-20241022"


def table(**row_overrides) -> dict:
    """Return a one-model price table.

    USD per million: $3 input, $3.75 5-min write, $6 1-hour write, $0.30 read, $15 output.
    """
    row = {
        "id": "test-model",
        "input": "3",
        "output": "15",
        "cache_write_5m": "3.75",
        "cache_write_1h": "6",
        "cache_read": "0.30",
        "source": "https://example.invalid/pricing",
        "checked": "2026-01-01",
    }
    row.update(row_overrides)
    row = {key: value for key, value in row.items() if value is not None}
    return {"version": "test", "models": [row], "server_tools": {"web_search": "0.01"}}


@pytest.fixture(scope="module")
def bundled():
    return PriceBook.load()


def test_cache_write_priced_at_write_rate():
    book = PriceBook.from_dict(table())
    usage = usage_from_anthropic(
        {
            "input_tokens": 3,
            "cache_creation_input_tokens": 12304,
            "cache_read_input_tokens": 0,
            "output_tokens": 550,
        }
    )

    cost = book.quote("test-model", usage).cost_usd

    assert cost == Decimal("0.054399")
    # Counting the cache writes as input at $3 as well as writes at $3.75 gives this figure.
    assert cost != Decimal("0.091311")


def test_haiku_3_5_streamed_cache_read(bundled):
    usage = usage_from_anthropic(
        {
            "input_tokens": 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 2455,
            "output_tokens": 23,
        }
    )

    quote = bundled.quote(HAIKU_3_5, usage)

    assert quote.cost_usd == Decimal("0.0002916")
    assert quote.price_id == HAIKU_3_5


def test_sonnet_4_one_hour_write(bundled):
    usage = usage_from_anthropic(
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 10000,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 10000},
            "output_tokens": 100,
        }
    )

    quote = bundled.quote(SONNET_4, usage)

    assert usage.cache_write_1h_tokens == 10000
    assert usage.cache_write_5m_tokens == 0
    assert quote.cost_usd == Decimal("0.06153")


def test_sonnet_4_long_context_reprices_all(bundled):
    usage = Usage(input_tokens=200000, cache_write_5m_tokens=5000, output_tokens=1000)

    quote = bundled.quote(SONNET_4, usage)

    assert quote.cost_usd == Decimal("1.26")
    assert quote.long_context is True


@pytest.mark.parametrize(
    ("input_tokens", "expected"),
    [
        pytest.param(194999, Decimal("0.618747"), id="one-below"),
        pytest.param(195000, Decimal("0.61875"), id="exactly-at-threshold"),
    ],
)
def test_sonnet_4_below_threshold_base_rates(bundled, input_tokens, expected):
    usage = Usage(input_tokens=input_tokens, cache_write_5m_tokens=5000, output_tokens=1000)

    quote = bundled.quote(SONNET_4, usage)

    assert quote.cost_usd == expected
    assert quote.long_context is False


def test_long_context_counts_cache_reads(bundled):
    # Cache reads are part of the prompt, so they alone can cross the threshold.
    usage = Usage(input_tokens=1000, cache_read_tokens=200000, output_tokens=10)

    quote = bundled.quote(SONNET_4, usage)

    assert quote.long_context is True
    assert quote.cost_usd == Decimal("0.126225")


@pytest.mark.parametrize(
    "bucket",
    ["input_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens", "cache_read_tokens", "output_tokens"],
)
def test_batch_halves_bucket(bucket):
    book = PriceBook.from_dict(table())
    usage = Usage(**{bucket: 1_000_000})

    standard = book.quote("test-model", usage).cost_usd
    batch = book.quote("test-model", usage, batch=True)

    assert standard > 0
    assert batch.cost_usd == standard / 2
    assert batch.batch is True


def test_batch_halves_mixed_usage():
    book = PriceBook.from_dict(table())
    usage = Usage(input_tokens=3, cache_write_5m_tokens=12304, cache_read_tokens=100, output_tokens=550)

    assert book.quote("test-model", usage, batch=True).cost_usd == Decimal("0.0272145")


def test_web_search_priced_per_request():
    book = PriceBook.from_dict(table())
    tokens_only = Usage(input_tokens=1000, output_tokens=100)
    with_searches = usage_from_anthropic(
        {"input_tokens": 1000, "output_tokens": 100, "server_tool_use": {"web_search_requests": 3}}
    )

    base = book.quote("test-model", tokens_only).cost_usd
    searched = book.quote("test-model", with_searches).cost_usd

    assert with_searches.web_search_requests == 3
    assert searched - base == Decimal("0.03")


def test_bundled_web_search_price(bundled):
    assert bundled.web_search_usd == Decimal("0.01")


def test_missing_breakdown_priced_as_5m():
    book = PriceBook.from_dict(table())
    usage = usage_from_anthropic({"input_tokens": 0, "cache_creation_input_tokens": 1000, "output_tokens": 0})

    assert usage.cache_write_5m_tokens == 1000
    assert usage.cache_write_1h_tokens == 0
    assert "cache_ttl_unknown" in usage.flags
    assert book.quote("test-model", usage).cost_usd == Decimal("0.00375")


def test_breakdown_present_not_flagged():
    usage = usage_from_anthropic(
        {
            "input_tokens": 1,
            "cache_creation_input_tokens": 30,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
            "output_tokens": 1,
        }
    )

    assert usage.cache_write_5m_tokens == 10
    assert usage.cache_write_1h_tokens == 20
    assert usage.flags == frozenset()


@pytest.mark.parametrize(
    ("model", "price_id"),
    [
        pytest.param("claude-sonnet-4-20250514", SONNET_4, id="exact"),
        pytest.param("claude-sonnet-4-0", SONNET_4, id="alias"),
        pytest.param("claude-opus-4-6-20260205", "claude-opus-4-6", id="date-suffix"),
        pytest.param("us.anthropic.claude-3-5-haiku-20241022-v1:0", HAIKU_3_5, id="bedrock-us"),
        pytest.param("eu.anthropic.claude-sonnet-4-20250514-v1:0", SONNET_4, id="bedrock-eu"),
        pytest.param("apac.anthropic.claude-sonnet-4-20250514-v1:0", SONNET_4, id="bedrock-apac"),
        pytest.param(
            "global.anthropic.claude-sonnet-4-5-20250929-v1:0",
            "claude-sonnet-4-5-20250929",
            id="bedrock-global",
        ),
        pytest.param("anthropic.claude-3-5-haiku-20241022-v1:0", HAIKU_3_5, id="bedrock-no-region"),
        pytest.param("anthropic.claude-opus-4-6-v1", "claude-opus-4-6", id="bedrock-dateless"),
        pytest.param("claude-3-5-haiku@20241022", HAIKU_3_5, id="vertex"),
        pytest.param("claude-sonnet-4@20250514", SONNET_4, id="vertex-sonnet-4"),
    ],
)
def test_model_id_resolves(bundled, model, price_id):
    row = bundled.lookup(model)

    assert row is not None
    assert row.id == price_id


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("claude-sonnet-4-9-20270101", id="newer-version"),
        pytest.param("claude-sonnet-4-9", id="newer-version-undated"),
        pytest.param("us.anthropic.claude-sonnet-4-9-20270101-v1:0", id="newer-version-bedrock"),
        pytest.param("claude-sonnet-4-9@20270101", id="newer-version-vertex"),
        pytest.param("claude-sonnet", id="family-prefix"),
        pytest.param("gemini-2.5-pro", id="other-vendor"),
        pytest.param("", id="empty"),
    ],
)
def test_unknown_model_unpriced(bundled, model):
    assert bundled.lookup(model) is None
    assert bundled.quote(model, Usage(input_tokens=10, output_tokens=10)) is None


def test_normalize_bedrock_arn():
    arn = (
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0"
    )

    assert normalize_model_id(arn) == HAIKU_3_5


def test_bundled_table_loads(bundled):
    assert bundled.version
    assert len(bundled.models) > 0


def test_bundled_rows_have_source_and_checked():
    text = resources.files("llmcost_mw").joinpath("data/prices.toml").read_text("utf-8")
    rows = tomllib.loads(text)["models"]

    missing = [row["id"] for row in rows if not row.get("source") or not row.get("checked")]

    assert rows
    assert missing == []


def test_bundled_ids_unique(bundled):
    names = [name for row in bundled.models for name in (row.id, *row.aliases)]

    duplicates = sorted({name for name in names if names.count(name) > 1})

    assert duplicates == []


def test_bundled_prices_are_decimals(bundled):
    rates = [row.rates for row in bundled.models]

    assert all(isinstance(rate.input, Decimal) for rate in rates)
    # Embedding models produce no output tokens, so their output price is 0.
    assert all(rate.output > rate.input for rate in rates if rate.output != 0)
    embeddings = [row.id for row in bundled.models if row.rates.output == 0]
    assert embeddings == ["text-embedding-3-small", "text-embedding-3-large"]


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        pytest.param({"input": 3.0}, ["input", "3.0", "float"], id="float-price"),
        pytest.param({"cache_read": None}, ["cache_read", "test-model"], id="missing-bucket"),
        pytest.param({"source": None}, ["source", "test-model"], id="missing-source"),
        pytest.param({"checked": None}, ["checked", "test-model"], id="missing-checked"),
        pytest.param({"output": "fifteen"}, ["output", "fifteen"], id="not-a-number"),
        pytest.param({"output": "-1"}, ["output", "-1"], id="negative"),
    ],
)
def test_malformed_table_raises(overrides, fragments):
    with pytest.raises(PriceTableError) as excinfo:
        PriceBook.from_dict(table(**overrides))

    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message


def test_malformed_file_names_value(tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        'version = "x"\n'
        "[[models]]\n"
        'id = "m"\n'
        'input = "3"\noutput = "15"\ncache_write_5m = 3.75\ncache_write_1h = "6"\ncache_read = "0.3"\n'
        'source = "https://example.invalid"\nchecked = "2026-01-01"\n',
        encoding="utf-8",
    )

    with pytest.raises(PriceTableError, match=r"cache_write_5m = 3\.75"):
        PriceBook.load(path)


def test_duplicate_alias_raises():
    data = table()
    data["models"].append({**data["models"][0], "id": "other-model", "aliases": ["test-model"]})

    with pytest.raises(PriceTableError, match="test-model"):
        PriceBook.from_dict(data)
