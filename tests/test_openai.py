"""The real openai SDK against a fake OpenAI server on 127.0.0.1, recorded through `instrument()`.

Unless a test states otherwise, a call reports 1000 prompt tokens (400 of them
cached) and 300 completion tokens (120 of them reasoning), so its row has
600 uncached input, 400 cache-read and 300 output tokens.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pydantic
import pytest

from fake_openai import AZURE_MODEL, FakeOpenAI
from llmcost_mw import attribute, current_tracker, tracked_create
from llmcost_mw.errors import ConfigurationError
from llmcost_mw.pricing import PriceBook
from llmcost_mw.providers import openai as openai_hooks
from llmcost_mw.usage import usage_from_openai

CHAT_MODEL = "gpt-4.1-mini"
# gpt-4.1-mini at $0.40 input, $0.10 cached input, $1.60 output per million:
# 600*0.40 + 400*0.10 + 300*1.60 = 240 + 40 + 480 = 760 micro-dollars.
CHAT_COST = Decimal("0.00076")
RESPONSES_MODEL = "gpt-5"
# gpt-5 at $1.25 input, $0.125 cached input, $10 output per million:
# 600*1.25 + 400*0.125 + 300*10 = 750 + 50 + 3000 = 3800 micro-dollars.
RESPONSES_COST = Decimal("0.0038")
COMPLETIONS_MODEL = "gpt-4.1-nano"
# gpt-4.1-nano at $0.10 input, $0.025 cached input, $0.40 output per million:
# 600*0.10 + 400*0.025 + 300*0.40 = 60 + 10 + 120 = 190 micro-dollars.
COMPLETIONS_COST = Decimal("0.00019")
MESSAGES = [{"role": "user", "content": "Capital of France?"}]
INCLUDE_USAGE = {"include_usage": True}


class Answer(pydantic.BaseModel):
    answer: str


@pytest.fixture
def fake():
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
def clients(fake):
    """Builds sync and async OpenAI clients aimed at the fake server, and closes them after the test."""
    built: list = []

    def build(*, asynchronous: bool = False, max_retries: int = 0):
        cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        client = cls(api_key="k", base_url=f"{fake.base_url}/v1", max_retries=max_retries)
        built.append(client)
        return client

    yield build
    for client in built:
        if isinstance(client, openai.AsyncOpenAI):
            asyncio.run(client.close())
        else:
            client.close()


def rows_after_flush(tracker):
    assert tracker.recorder.flush(timeout_seconds=10)
    return tracker.recorder.store.fetch_events()


def sample(registry, name, **labels):
    """Read a sample as a scrape would: queued calls are counted first."""
    tracker = current_tracker()
    if tracker is not None:
        tracker.process_pending()
    return registry.get_sample_value(name, labels) or 0.0


def cost_of(row) -> Decimal | None:
    return None if row["cost_usd"] is None else Decimal(str(row["cost_usd"]))


def assert_cached_reasoning_buckets(row):
    assert row["input_tokens"] == 600
    assert row["cache_read_tokens"] == 400
    assert row["cache_write_5m_tokens"] == 0
    assert row["cache_write_1h_tokens"] == 0
    assert row["output_tokens"] == 300
    assert row["reasoning_tokens"] == 120
    assert row["prompt_tokens"] == 1000
    assert row["completion_tokens"] == 300


def assert_empty_buckets(row):
    for column in (
        "input_tokens",
        "cache_read_tokens",
        "cache_write_5m_tokens",
        "output_tokens",
        "reasoning_tokens",
    ):
        assert row[column] == 0, column


def only_row(tracker):
    rows = rows_after_flush(tracker)
    assert len(rows) == 1
    return rows[0]


# ---------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------


def test_chat_create_row(tracker, registry, fake, clients):
    client = clients()

    with attribute(user_id="u1", feature="qa"):
        client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    row = only_row(tracker)

    assert row["provider"] == "openai"
    assert row["model"] == CHAT_MODEL
    assert row["request_model"] == CHAT_MODEL
    assert row["response_id"] == "chatcmpl-1"
    assert row["status"] == "ok"
    assert row["user_id"] == "u1"
    assert row["feature"] == "qa"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST
    assert row["unpriced"] is False
    assert row["price_id"] == CHAT_MODEL
    assert row["latency_ms"] > 0
    assert sample(
        registry, "llmcost_cost_usd_total", provider="openai", model=CHAT_MODEL, feature="qa"
    ) == float(CHAT_COST)
    assert (
        sample(
            registry, "llmcost_calls_total", provider="openai", model=CHAT_MODEL, feature="qa", status="ok"
        )
        == 1
    )
    assert len(fake.posts()) == 1


def test_chat_dated_model_priced(tracker, fake, clients):
    client = clients()

    client.chat.completions.create(model="gpt-4.1-mini-2025-04-14", messages=MESSAGES)
    row = only_row(tracker)

    assert row["model"] == "gpt-4.1-mini-2025-04-14"
    assert row["price_id"] == CHAT_MODEL
    assert cost_of(row) == CHAT_COST


def test_chat_unknown_model_unpriced(tracker, registry, fake, clients):
    client = clients()

    with attribute(feature="qa"):
        client.chat.completions.create(model="gpt-9-turbo", messages=MESSAGES)
    row = only_row(tracker)

    assert row["status"] == "ok"
    assert row["cost_usd"] is None
    assert row["unpriced"] is True
    assert_cached_reasoning_buckets(row)
    assert sample(registry, "llmcost_unpriced_calls_total", provider="openai", model="gpt-9-turbo") == 1


def test_chat_stream_include_usage(tracker, registry, fake, clients):
    client = clients()

    with attribute(user_id="u2", feature="chat"):
        stream = client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
        )
        chunks = list(stream)
    row = only_row(tracker)

    assert len(chunks) == 5
    assert row["status"] == "ok"
    assert row["response_id"] == "chatcmpl-s1"
    assert row["user_id"] == "u2"
    assert row["feature"] == "chat"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST
    assert sample(
        registry, "llmcost_cost_usd_total", provider="openai", model=CHAT_MODEL, feature="chat"
    ) == float(CHAT_COST)
    assert len(fake.posts()) == 1


def test_chat_stream_without_usage_unknown(tracker, registry, fake, clients):
    client = clients()

    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    row = only_row(tracker)

    assert len(chunks) == 4
    # The recorder must not add `stream_options` to the caller's request.
    assert "stream_options" not in fake.posts()[0].body
    assert row["status"] == "ok"
    assert row["flags"] == "usage_unknown"
    assert row["cost_usd"] is None
    assert row["unpriced"] is True
    assert_empty_buckets(row)
    assert sample(registry, "llmcost_unpriced_calls_total", provider="openai", model=CHAT_MODEL) == 1


def test_chat_stream_closed_early_incomplete(tracker, fake, clients):
    client = clients()

    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    next(iter(stream))
    stream.close()
    row = only_row(tracker)

    assert row["status"] == "incomplete"
    assert row["flags"] == "usage_unknown"
    assert row["cost_usd"] is None
    assert_empty_buckets(row)


def test_chat_stream_dropped_unread_not_consumed(tracker, fake, clients):
    import gc

    client = clients()

    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    del stream
    gc.collect()
    row = only_row(tracker)

    assert row["status"] == "not_consumed"
    assert_empty_buckets(row)


def test_chat_stream_never_read_not_consumed(tracker, fake, clients):
    client = clients()

    stream = client.chat.completions.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    stream.close()
    row = only_row(tracker)

    assert row["status"] == "not_consumed"
    assert row["response_id"] is None
    assert_empty_buckets(row)


def test_chat_stream_helper(tracker, fake, clients):
    client = clients()

    with attribute(feature="helper"):
        with client.chat.completions.stream(
            model=CHAT_MODEL, messages=MESSAGES, stream_options=INCLUDE_USAGE
        ) as stream:
            final = stream.get_final_completion()
    row = only_row(tracker)

    assert final.usage.prompt_tokens == 1000
    assert row["status"] == "ok"
    assert row["feature"] == "helper"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST
    assert len(fake.posts()) == 1


def test_chat_stream_helper_exit_early(tracker, fake, clients):
    client = clients()

    with client.chat.completions.stream(
        model=CHAT_MODEL, messages=MESSAGES, stream_options=INCLUDE_USAGE
    ) as stream:
        next(iter(stream))
    row = only_row(tracker)

    assert row["status"] == "incomplete"
    assert row["flags"] == "usage_unknown"
    assert row["cost_usd"] is None


def test_chat_parse(tracker, fake, clients):
    client = clients()

    completion = client.chat.completions.parse(model=CHAT_MODEL, messages=MESSAGES, response_format=Answer)
    row = only_row(tracker)

    assert completion.choices[0].message.parsed == Answer(answer="Paris")
    assert row["status"] == "ok"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST


def test_chat_with_raw_response(tracker, fake, clients):
    client = clients()

    raw = client.chat.completions.with_raw_response.create(model=CHAT_MODEL, messages=MESSAGES)
    completion = raw.parse()
    row = only_row(tracker)

    assert completion.id == "chatcmpl-1"
    assert row["status"] == "ok"
    assert row["response_id"] == "chatcmpl-1"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST


def test_chat_raw_stream_parsed(tracker, fake, clients):
    client = clients()

    raw = client.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    chunks = list(raw.parse())
    row = only_row(tracker)

    assert len(chunks) == 5
    assert row["status"] == "ok"
    assert cost_of(row) == CHAT_COST


def test_chat_with_streaming_response(tracker, fake, clients):
    client = clients()

    with client.chat.completions.with_streaming_response.create(
        model=CHAT_MODEL, messages=MESSAGES
    ) as response:
        completion = response.parse()
    row = only_row(tracker)

    assert completion.id == "chatcmpl-1"
    assert row["status"] == "ok"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST


def test_chat_streaming_response_unread(tracker, fake, clients):
    client = clients()

    with client.chat.completions.with_streaming_response.create(model=CHAT_MODEL, messages=MESSAGES):
        pass
    row = only_row(tracker)

    assert row["status"] == "not_consumed"
    assert_empty_buckets(row)


def test_chat_retry_one_row(tracker, registry, fake, clients):
    client = clients(max_retries=2)

    client.chat.completions.create(model=f"{CHAT_MODEL}-retry500", messages=MESSAGES)
    row = only_row(tracker)

    assert [request.headers.get("x-stainless-retry-count") for request in fake.posts()] == ["0", "1"]
    assert row["status"] == "ok"
    assert row["model"] == CHAT_MODEL
    assert row["request_model"] == f"{CHAT_MODEL}-retry500"
    assert cost_of(row) == CHAT_COST
    assert (
        sample(
            registry,
            "llmcost_calls_total",
            provider="openai",
            model=CHAT_MODEL,
            feature="unknown",
            status="ok",
        )
        == 1
    )


def test_chat_final_failure_error_row(tracker, registry, fake, clients):
    client = clients(max_retries=2)
    model = f"{CHAT_MODEL}-fail500"

    with attribute(user_id="u3"), pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=model, messages=MESSAGES)
    row = only_row(tracker)

    assert len(fake.posts()) == 3
    assert row["status"] == "error"
    assert row["error_type"] == "InternalServerError"
    assert row["user_id"] == "u3"
    assert row["model"] == model
    assert_empty_buckets(row)
    assert (
        sample(
            registry, "llmcost_calls_total", provider="openai", model=model, feature="unknown", status="error"
        )
        == 1
    )


def test_chat_invalid_usage_flagged(tracker, fake, clients):
    client = clients()

    completion = client.chat.completions.create(model=f"{CHAT_MODEL}-badusage", messages=MESSAGES)
    row = only_row(tracker)

    assert completion.id == "chatcmpl-1"
    assert row["status"] == "ok"
    assert "usage_invalid" in row["flags"]
    assert row["cost_usd"] is None
    assert row["unpriced"] is True
    assert_empty_buckets(row)


def test_async_chat_create_and_stream(tracker, fake, clients):
    client = clients(asynchronous=True)

    async def calls():
        with attribute(user_id="u4", feature="async"):
            await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
            stream = await client.chat.completions.create(
                model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
            )
            async for _chunk in stream:
                pass

    asyncio.run(calls())
    rows = rows_after_flush(tracker)

    assert len(rows) == 2
    assert len(fake.posts()) == 2
    for row in rows:
        assert row["status"] == "ok"
        assert row["user_id"] == "u4"
        assert row["feature"] == "async"
        assert_cached_reasoning_buckets(row)
        assert cost_of(row) == CHAT_COST


def test_async_stream_closed_early(tracker, fake, clients):
    client = clients(asynchronous=True)

    async def call():
        stream = await client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
        )
        await stream.__anext__()
        await stream.close()

    asyncio.run(call())
    row = only_row(tracker)

    assert row["status"] == "incomplete"
    assert row["cost_usd"] is None


def test_azure_deployment_priced_by_response_model(tracker, registry, fake):
    client = openai.AzureOpenAI(
        api_key="k", azure_endpoint=fake.base_url, api_version="2024-10-21", max_retries=0
    )
    try:
        with attribute(feature="azure"):
            client.chat.completions.create(model="my-deployment", messages=MESSAGES)
    finally:
        client.close()
    row = only_row(tracker)

    assert fake.posts()[0].path.startswith("/openai/deployments/my-deployment/chat/completions")
    assert row["provider"] == "azure.openai"
    assert row["request_model"] == "my-deployment"
    assert row["model"] == AZURE_MODEL
    assert row["price_id"] == CHAT_MODEL
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == CHAT_COST
    assert sample(
        registry, "llmcost_cost_usd_total", provider="azure.openai", model=AZURE_MODEL, feature="azure"
    ) == (float(CHAT_COST))


def test_tracked_create_openai_client(tracker, fake, clients):
    client = clients()

    tracked_create(client, feature="billing", user_id="u5", model=CHAT_MODEL, messages=MESSAGES)
    row = only_row(tracker)

    assert row["feature"] == "billing"
    assert row["user_id"] == "u5"
    assert cost_of(row) == CHAT_COST


def test_tracked_create_async_openai_client(tracker, fake, clients):
    client = clients(asynchronous=True)

    asyncio.run(tracked_create(client, feature="billing", model=CHAT_MODEL, messages=MESSAGES))
    row = only_row(tracker)

    assert row["feature"] == "billing"
    assert cost_of(row) == CHAT_COST


# ---------------------------------------------------------------------------
# Responses API, embeddings, legacy completions
# ---------------------------------------------------------------------------


def test_responses_create_row(tracker, registry, fake, clients):
    client = clients()

    with attribute(user_id="u6", feature="agent"):
        response = client.responses.create(model=RESPONSES_MODEL, input="Summarize this.")
    row = only_row(tracker)

    assert response.id == "resp_1"
    assert row["provider"] == "openai"
    assert row["model"] == RESPONSES_MODEL
    assert row["response_id"] == "resp_1"
    assert row["status"] == "ok"
    assert row["user_id"] == "u6"
    assert row["feature"] == "agent"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == RESPONSES_COST
    assert sample(
        registry, "llmcost_cost_usd_total", provider="openai", model=RESPONSES_MODEL, feature="agent"
    ) == float(RESPONSES_COST)
    assert len(fake.posts()) == 1


def test_responses_stream_true(tracker, fake, clients):
    client = clients()

    events = list(client.responses.create(model=RESPONSES_MODEL, input="Summarize this.", stream=True))
    row = only_row(tracker)

    assert [event.type for event in events][-1] == "response.completed"
    assert row["status"] == "ok"
    assert row["response_id"] == "resp_s1"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == RESPONSES_COST


def test_responses_stream_incomplete_event(tracker, fake, clients):
    fake.responses_terminal = "response.incomplete"
    client = clients()

    list(client.responses.create(model=RESPONSES_MODEL, input="Summarize this.", stream=True))
    row = only_row(tracker)

    # The response stopped at its token limit, but the call ended normally
    # and its tokens are billed.
    assert row["status"] == "ok"
    assert row["flags"] == "response_incomplete"
    assert cost_of(row) == RESPONSES_COST


def test_responses_stream_failed_event(tracker, fake, clients):
    fake.responses_terminal = "response.failed"
    client = clients()

    list(client.responses.create(model=RESPONSES_MODEL, input="Summarize this.", stream=True))
    row = only_row(tracker)

    assert row["status"] == "error"
    assert row["error_type"] == "ResponseFailed"
    assert cost_of(row) == RESPONSES_COST


def test_responses_stream_helper(tracker, fake, clients):
    client = clients()

    with attribute(feature="helper"):
        with client.responses.stream(model=RESPONSES_MODEL, input="Summarize this.") as stream:
            final = stream.get_final_response()
    row = only_row(tracker)

    assert final.id == "resp_s1"
    assert row["status"] == "ok"
    assert row["feature"] == "helper"
    assert cost_of(row) == RESPONSES_COST
    assert len(fake.posts()) == 1


def test_async_responses_stream_helper(tracker, fake, clients):
    client = clients(asynchronous=True)

    async def call():
        async with client.responses.stream(model=RESPONSES_MODEL, input="Summarize this.") as stream:
            return await stream.get_final_response()

    final = asyncio.run(call())
    row = only_row(tracker)

    assert final.id == "resp_s1"
    assert row["status"] == "ok"
    assert cost_of(row) == RESPONSES_COST


def test_responses_gets_and_input_tokens_not_recorded(tracker, fake, clients):
    client = clients()

    client.responses.retrieve("resp_1")
    client.responses.input_tokens.count(model=RESPONSES_MODEL, input="Summarize this.")

    assert len(fake.seen) == 2
    assert rows_after_flush(tracker) == []


def test_responses_background_usage_unknown(tracker, fake, clients):
    client = clients()

    client.responses.create(model=RESPONSES_MODEL, input="Summarize this.", background=True)
    row = only_row(tracker)

    assert row["status"] == "ok"
    assert row["response_id"] == "resp_bg"
    assert row["flags"] == "usage_unknown"
    assert row["cost_usd"] is None
    assert row["unpriced"] is True


def test_embeddings_row(tracker, registry, fake, clients):
    client = clients()

    with attribute(feature="search"):
        result = client.embeddings.create(model="text-embedding-3-small", input="hello")
    row = only_row(tracker)

    assert result.data[0].embedding == [0.25, -0.5]
    assert row["model"] == "text-embedding-3-small"
    assert row["status"] == "ok"
    assert row["feature"] == "search"
    assert row["input_tokens"] == 8
    assert row["output_tokens"] == 0
    assert row["cache_read_tokens"] == 0
    # 8 input tokens at $0.02 per million.
    assert Decimal(str(row["cost_usd"])) == Decimal("0.00000016")
    assert row["unpriced"] is False
    assert (
        sample(
            registry,
            "llmcost_calls_total",
            provider="openai",
            model="text-embedding-3-small",
            feature="search",
            status="ok",
        )
        == 1
    )
    assert len(fake.posts()) == 1


def test_legacy_completions_row(tracker, fake, clients):
    client = clients()

    client.completions.create(model=COMPLETIONS_MODEL, prompt="Say done")
    row = only_row(tracker)

    assert row["response_id"] == "cmpl-1"
    assert row["status"] == "ok"
    assert_cached_reasoning_buckets(row)
    assert cost_of(row) == COMPLETIONS_COST


# ---------------------------------------------------------------------------
# Usage parsing, price lookup and version check
# ---------------------------------------------------------------------------


def test_usage_from_openai_shapes():
    chat = usage_from_openai(
        {
            "prompt_tokens": 100,
            "completion_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 10},
        }
    )
    responses = usage_from_openai(
        {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 30}, "output_tokens": 50}
    )
    embeddings = usage_from_openai({"prompt_tokens": 8, "total_tokens": 8})

    assert (chat.input_tokens, chat.cache_read_tokens, chat.cache_write_5m_tokens) == (50, 30, 20)
    assert (chat.output_tokens, chat.reasoning_tokens, chat.prompt_tokens) == (50, 10, 100)
    assert (responses.input_tokens, responses.cache_read_tokens, responses.output_tokens) == (70, 30, 50)
    assert (embeddings.input_tokens, embeddings.output_tokens) == (8, 0)
    completion_only = usage_from_openai({"prompt_tokens": None, "completion_tokens": 300})
    assert (completion_only.input_tokens, completion_only.output_tokens) == (0, 300)


@pytest.mark.parametrize(
    "usage",
    [
        pytest.param({"prompt_tokens": -1, "completion_tokens": 2}, id="negative"),
        pytest.param({"prompt_tokens": "many", "completion_tokens": 2}, id="non-numeric"),
        pytest.param(
            {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}}, id="cached-over-prompt"
        ),
        pytest.param({"total_tokens": 300}, id="no-known-count"),
        pytest.param({}, id="empty"),
    ],
)
def test_usage_from_openai_invalid_raises(usage):
    with pytest.raises(ValueError):
        usage_from_openai(usage)


def test_cache_write_priced_at_input():
    book = PriceBook.load()
    usage = usage_from_openai({"prompt_tokens": 1000, "prompt_tokens_details": {"cache_write_tokens": 1000}})

    quote = book.quote("gpt-5", usage)

    # 1000 cache-write tokens at the $1.25 input rate.
    assert quote.cost_usd == Decimal("0.00125")


@pytest.mark.parametrize(
    ("model", "price_id"),
    [
        pytest.param("gpt-5-mini-2025-08-07", "gpt-5-mini", id="dashed-date"),
        pytest.param("gpt-4.1-2025-04-14", "gpt-4.1", id="dotted-name"),
        pytest.param("gpt-5-mini-2025-08", None, id="partial-date"),
        pytest.param("gpt-5-mini-high", None, id="no-prefix-fallback"),
        pytest.param("gpt-5.9", None, id="unknown-version"),
        pytest.param("gpt-4o-2024-08-06", "gpt-4o", id="later-snapshot"),
        pytest.param("gpt-4o-2024-05-13", "gpt-4o-2024-05-13", id="snapshot-with-own-price"),
    ],
)
def test_openai_lookup(model, price_id):
    row = PriceBook.load().lookup(model)

    assert (row.id if row is not None else None) == price_id


def test_unsupported_version_raises(monkeypatch):
    openai_hooks.unpatch()
    monkeypatch.setattr(openai, "__version__", "2.9.0")

    with pytest.raises(ConfigurationError, match=r"openai>=3\.60,<4"):
        openai_hooks.patch(current_tracker())


def test_unsupported_version_skipped_by_instrument(monkeypatch, caplog, store, tmp_path):
    from llmcost_mw import instrument, uninstrument
    from llmcost_mw.recorder import Recorder

    monkeypatch.setattr(openai, "__version__", "2.9.0")
    recorder = Recorder(store, spill_path=tmp_path / "version.spill.jsonl")

    with caplog.at_level("WARNING", logger="llmcost_mw.instrumentation"):
        tracker = instrument(store=store, recorder=recorder, registry=None)
    uninstrument()
    recorder.close(timeout_seconds=2)

    assert tracker is not None
    assert "OpenAI calls are not recorded" in caplog.text
    assert "openai>=3.60,<4" in caplog.text


ABANDONED_STREAM_CHILD = """
import sys
import openai
import llmcost_mw
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store

store = Store(sys.argv[1])
llmcost_mw.instrument(store=store, recorder=Recorder(store), registry=None)
client = openai.OpenAI(api_key="k", base_url=sys.argv[2], max_retries=0)


def first_chunk():
    stream = client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        return chunk  # leaves the stream open and unread


first_chunk()
print("done", flush=True)
"""


@pytest.mark.timeout(120)
def test_stream_left_open_at_exit_does_not_hang(fake, tmp_path):
    # The stream and its generator form a cycle that only the collector
    # frees, which at exit runs after the recorder's exit hook.
    import subprocess
    import sys

    from llmcost_mw.recorder import Recorder
    from llmcost_mw.store import Store

    url = f"sqlite:///{tmp_path / 'costs.db'}"
    script = tmp_path / "child.py"
    script.write_text(ABANDONED_STREAM_CHILD, encoding="utf-8")

    child = subprocess.run(
        [sys.executable, str(script), url, f"{fake.base_url}/v1"], capture_output=True, text=True, timeout=60
    )
    store = Store(url)
    recorder = Recorder(store, spill_path=tmp_path / "costs.db.spill.jsonl")
    assert recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    rows = store.fetch_events()
    store.dispose()

    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "done"
    assert [row["status"] for row in rows] == ["incomplete"]


def test_malformed_chunk_does_not_break_stream(tracker, fake, clients):
    client = clients()

    stream = client.chat.completions.create(
        model=f"{CHAT_MODEL}-malformed", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    chunks = list(stream)
    row = only_row(tracker)

    # The caller sees every chunk, the malformed one included.
    assert len(chunks) == 6
    assert row["flags"] == "usage_invalid"
    assert row["cost_usd"] is None


def test_stream_cut_by_server_incomplete(tracker, fake, clients):
    client = clients()

    stream = client.chat.completions.create(
        model=f"{CHAT_MODEL}-cut", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
    )
    with pytest.raises(openai.APIConnectionError):
        list(stream)
    row = only_row(tracker)

    assert row["status"] == "incomplete"
    assert row["error_type"] == "APIConnectionError"
    assert row["cost_usd"] is None


def test_parse_cut_at_token_limit_still_priced(tracker, fake, clients):
    # The reply was billed, although parse() raises for it.
    client = clients()

    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model=f"{CHAT_MODEL}-length", messages=MESSAGES, response_format=Answer)
    row = only_row(tracker)

    assert row["status"] == "error"
    assert row["error_type"] == "LengthFinishReasonError"
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (600, 400, 300)
    # 600 x $0.40 + 400 x $0.10 + 300 x $1.60 per million tokens.
    assert Decimal(str(row["cost_usd"])) == Decimal("0.00076")


def test_strict_mode_accepts_unknown_usage_of_listed_model(tracker, fake, clients):
    # Strict mode raises for a model missing from the price table; a listed
    # model whose stream reported no usage is recorded unpriced, without raising.
    tracker.strict = True
    client = clients()

    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True))
    row = only_row(tracker)

    assert len(chunks) == 4
    assert row["flags"] == "usage_unknown"
    assert row["unpriced"] is True


def test_responses_stream_left_at_terminal_event_ok(tracker, fake, clients):
    client = clients()

    stream = client.responses.create(model=RESPONSES_MODEL, input="hi", stream=True)
    for event in stream:
        if event.type == "response.completed":
            break
    stream.close()
    row = only_row(tracker)

    assert row["status"] == "ok"
    assert row["cost_usd"] is not None


def test_chat_chunks_with_type_field_priced(tracker, fake, clients):
    client = clients()

    chunks = list(
        client.chat.completions.create(
            model=f"{CHAT_MODEL}-typed", messages=MESSAGES, stream=True, stream_options=INCLUDE_USAGE
        )
    )
    row = only_row(tracker)

    assert len(chunks) == 5
    assert row["status"] == "ok"
    assert Decimal(str(row["cost_usd"])) == Decimal("0.00076")
