"""Contract matrix: each billable Anthropic entry point writes exactly one correctly priced row.

The real anthropic SDK (sync and async) talks over HTTP to the local fake API
in `llmcost_mw.demo.fake_api`. Every case checks the row count, the token
buckets, the status and the exact cost of the row it leaves in a temporary
SQLite store, and that the Prometheus cost counter agrees with the store.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from anthropic import (
    AnthropicBedrock,
    AnthropicVertex,
    AsyncAnthropic,
    AsyncAnthropicBedrock,
    AsyncAnthropicVertex,
)
from prometheus_client import CollectorRegistry

from llmcost_mw import attribute, instrument, uninstrument
from llmcost_mw.demo.fake_api import FakeAnthropicAPI, Reply
from llmcost_mw.metrics import Metrics
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store

# Claude Sonnet 4.5: $3 input, $3.75 5-minute write, $6 1-hour write,
# $0.30 cache read and $15 output per million tokens.
MODEL = "claude-sonnet-4-5-20250929"
BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
VERTEX_MODEL = "claude-sonnet-4-5@20250929"
MODELS = {"anthropic": MODEL, "bedrock": BEDROCK_MODEL, "vertex": VERTEX_MODEL}
PROVIDERS = {"anthropic": "anthropic", "bedrock": "aws.bedrock", "vertex": "gcp.vertex_ai"}

MESSAGES = [{"role": "user", "content": "Summarize the quarterly report."}]

USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 100,
    "cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40},
    "cache_read_input_tokens": 200,
    "output_tokens": 42,
    "service_tier": "standard",
}
# What `message_start` reports: the input side in full, one output token so far.
START_USAGE = {**USAGE, "output_tokens": 1}
# `message_delta` carries cumulative totals. Adding them instead of replacing
# would double every input bucket.
DELTA_USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "output_tokens": 42,
}

# (uncached input, 5-minute writes, 1-hour writes, cache reads, output)
FULL_BUCKETS = (10, 60, 40, 200, 42)
START_BUCKETS = (10, 60, 40, 200, 1)
NO_BUCKETS = (0, 0, 0, 0, 0)
# 10*3 + 60*3.75 + 40*6 + 200*0.30 + 42*15 = 1185 micro-dollars.
FULL_COST = Decimal("0.001185")
# The same with 1 output token: 30 + 225 + 240 + 60 + 15 = 570 micro-dollars.
START_COST = Decimal("0.00057")

ATTRIBUTION = {"user_id": "u-matrix", "feature": "matrix", "request_id": "req-matrix"}


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with FakeAnthropicAPI() as fake:
        yield fake


@pytest.fixture
def fake_api(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def no_aws_metadata(monkeypatch):
    # Explicit keys keep botocore away from instance metadata. This is a second guard.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class Recording:
    """An instrumented process: a temporary SQLite store, its recorder and a fresh registry."""

    def __init__(self, tmp_path) -> None:
        self.db_path = tmp_path / "costs.db"
        self.store = Store(f"sqlite:///{self.db_path}")
        self.registry = CollectorRegistry()
        self.recorder = Recorder(self.store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05)
        self.tracker = instrument(store=self.store, recorder=self.recorder, metrics=Metrics(self.registry))

    def rows(self) -> list[dict[str, Any]]:
        assert self.recorder.flush(timeout_seconds=10)
        return self.store.fetch_events()

    def counted_cost(self) -> float:
        return sum(
            sample.value
            for metric in self.registry.collect()
            if metric.name == "llmcost_cost_usd"
            for sample in metric.samples
            if sample.name == "llmcost_cost_usd_total"
        )

    def counted_calls(self, status: str) -> float:
        return sum(
            sample.value
            for metric in self.registry.collect()
            if metric.name == "llmcost_calls"
            for sample in metric.samples
            if sample.name == "llmcost_calls_total" and sample.labels["status"] == status
        )

    def close(self) -> None:
        uninstrument()
        self.recorder.close(timeout_seconds=2.0)
        self.store.dispose()


@pytest.fixture
def recording(tmp_path):
    recording = Recording(tmp_path)
    yield recording
    recording.close()


def make_client(platform: str, is_async: bool, base_url: str) -> Any:
    common = {"base_url": base_url, "max_retries": 2, "timeout": 10}
    if platform == "anthropic":
        cls = AsyncAnthropic if is_async else anthropic.Anthropic
        return cls(api_key="test", **common)
    if platform == "bedrock":
        cls = AsyncAnthropicBedrock if is_async else AnthropicBedrock
        return cls(aws_region="us-east-1", aws_access_key="x", aws_secret_key="y", **common)
    cls = AsyncAnthropicVertex if is_async else AnthropicVertex
    return cls(region="us-east5", project_id="demo-project", access_token="x", **common)


def buckets(row: dict[str, Any]) -> tuple[int, ...]:
    return (
        row["input_tokens"],
        row["cache_write_5m_tokens"],
        row["cache_write_1h_tokens"],
        row["cache_read_tokens"],
        row["output_tokens"],
    )


# -- entry points -----------------------------------------------------------------------------
#
# Each entry point is a pair: a sync function and an async one, both called
# with (client, model). Errors that the SDK raises to the caller are expected
# and caught here, so the case only checks what was recorded.


def params(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": MESSAGES, **extra}


def create(client, model):
    client.messages.create(**params(model))


async def acreate(client, model):
    await client.messages.create(**params(model))


def create_stream(client, model):
    for _event in client.messages.create(**params(model, stream=True)):
        pass


async def acreate_stream(client, model):
    async for _event in await client.messages.create(**params(model, stream=True)):
        pass


def stream_text(client, model):
    with client.messages.stream(**params(model)) as stream:
        for _text in stream.text_stream:
            pass


async def astream_text(client, model):
    async with client.messages.stream(**params(model)) as stream:
        async for _text in stream.text_stream:
            pass


def stream_final(client, model):
    with client.messages.stream(**params(model)) as stream:
        assert stream.get_final_message().usage.output_tokens == 42


async def astream_final(client, model):
    async with client.messages.stream(**params(model)) as stream:
        assert (await stream.get_final_message()).usage.output_tokens == 42


def stream_left_early(client, model):
    with client.messages.stream(**params(model)) as stream:
        for event in stream:
            assert event.type == "message_start"
            break


async def astream_left_early(client, model):
    async with client.messages.stream(**params(model)) as stream:
        async for event in stream:
            assert event.type == "message_start"
            break


def create_stream_left_early(client, model):
    stream = client.messages.create(**params(model, stream=True))
    for event in stream:
        assert event.type == "message_start"
        break
    stream.close()


async def acreate_stream_left_early(client, model):
    stream = await client.messages.create(**params(model, stream=True))
    async for event in stream:
        assert event.type == "message_start"
        break
    await stream.close()


def stream_never_iterated(client, model):
    client.messages.create(**params(model, stream=True)).close()


async def astream_never_iterated(client, model):
    await (await client.messages.create(**params(model, stream=True))).close()


def stream_helper_never_iterated(client, model):
    with client.messages.stream(**params(model)):
        pass


async def astream_helper_never_iterated(client, model):
    async with client.messages.stream(**params(model)):
        pass


def beta_create(client, model):
    client.beta.messages.create(**params(model), betas=["context-management-2025-06-27"])


async def abeta_create(client, model):
    await client.beta.messages.create(**params(model), betas=["context-management-2025-06-27"])


def beta_stream(client, model):
    with client.beta.messages.stream(**params(model), betas=["context-management-2025-06-27"]) as stream:
        assert stream.get_final_message().usage.output_tokens == 42


async def abeta_stream(client, model):
    async with client.beta.messages.stream(
        **params(model), betas=["context-management-2025-06-27"]
    ) as stream:
        assert (await stream.get_final_message()).usage.output_tokens == 42


def raw_create(client, model):
    # The caller never parses: the usage must come from the body read by the SDK.
    response = client.messages.with_raw_response.create(**params(model))
    assert response.http_response.status_code == 200


async def araw_create(client, model):
    response = await client.messages.with_raw_response.create(**params(model))
    assert response.http_response.status_code == 200


def raw_create_parsed(client, model):
    assert client.messages.with_raw_response.create(**params(model)).parse().usage.output_tokens == 42


async def araw_create_parsed(client, model):
    response = await client.messages.with_raw_response.create(**params(model))
    assert (await response.parse()).usage.output_tokens == 42


def raw_stream(client, model):
    response = client.messages.with_raw_response.create(**params(model, stream=True))
    for _event in response.parse():
        pass


async def araw_stream(client, model):
    response = await client.messages.with_raw_response.create(**params(model, stream=True))
    async for _event in await response.parse():
        pass


def raw_stream_unparsed(client, model):
    client.messages.with_raw_response.create(**params(model, stream=True)).close()


async def araw_stream_unparsed(client, model):
    await (await client.messages.with_raw_response.create(**params(model, stream=True))).close()


def raw_stream_parsed_never_iterated(client, model):
    client.messages.with_raw_response.create(**params(model, stream=True)).parse().close()


async def araw_stream_parsed_never_iterated(client, model):
    response = await client.messages.with_raw_response.create(**params(model, stream=True))
    await (await response.parse()).close()


def streaming_response_create(client, model):
    with client.messages.with_streaming_response.create(**params(model)) as response:
        assert response.parse().usage.output_tokens == 42


async def astreaming_response_create(client, model):
    async with client.messages.with_streaming_response.create(**params(model)) as response:
        assert (await response.parse()).usage.output_tokens == 42


def streaming_response_unread(client, model):
    with client.messages.with_streaming_response.create(**params(model)):
        pass


async def astreaming_response_unread(client, model):
    async with client.messages.with_streaming_response.create(**params(model)):
        pass


def streaming_response_stream(client, model):
    with client.messages.with_streaming_response.create(**params(model, stream=True)) as response:
        for _event in response.parse():
            pass


async def astreaming_response_stream(client, model):
    async with client.messages.with_streaming_response.create(**params(model, stream=True)) as response:
        async for _event in await response.parse():
            pass


def streaming_response_lines(client, model):
    with client.messages.with_streaming_response.create(**params(model, stream=True)) as response:
        lines = list(response.iter_lines())
    assert any(line.startswith("event: message_stop") for line in lines)


async def astreaming_response_lines(client, model):
    async with client.messages.with_streaming_response.create(**params(model, stream=True)) as response:
        lines = [line async for line in response.iter_lines()]
    assert any(line.startswith("event: message_stop") for line in lines)


def create_raises(error: type[BaseException]) -> tuple[Callable, Callable]:
    def call(client, model):
        with pytest.raises(error):
            create(client, model)

    async def acall(client, model):
        with pytest.raises(error):
            await acreate(client, model)

    return call, acall


def create_stream_raises(error: type[BaseException]) -> tuple[Callable, Callable]:
    def call(client, model):
        with pytest.raises(error):
            create_stream(client, model)

    async def acall(client, model):
        with pytest.raises(error):
            await acreate_stream(client, model)

    return call, acall


# -- expected rows ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    status: str
    buckets: tuple[int, ...]
    # None: the call is recorded unpriced, with cost_usd NULL.
    cost: Decimal | None
    error_type: str | None = None
    flags: str | None = None
    has_response_id: bool = True


OK = Expect("ok", FULL_BUCKETS, FULL_COST)
INCOMPLETE = Expect("incomplete", START_BUCKETS, START_COST)
# The request was sent, so it may have been billed: the cost is unknown.
NOT_CONSUMED = Expect("not_consumed", NO_BUCKETS, None, flags="usage_unknown", has_response_id=False)


def json_reply() -> list[Reply]:
    return [Reply(usage=USAGE)]


def stream_reply() -> list[Reply]:
    return [Reply(usage=START_USAGE, delta_usage=DELTA_USAGE)]


@dataclass(frozen=True)
class EntryPoint:
    name: str
    call: Callable
    acall: Callable
    replies: Callable[[], list[Reply]]
    expect: Expect
    platforms: tuple[str, ...] = ("anthropic",)


ALL_PLATFORMS = ("anthropic", "bedrock", "vertex")

ENTRY_POINTS = [
    EntryPoint("create", create, acreate, json_reply, OK, ALL_PLATFORMS),
    EntryPoint("create-stream", create_stream, acreate_stream, stream_reply, OK, ALL_PLATFORMS),
    EntryPoint("stream-text", stream_text, astream_text, stream_reply, OK),
    EntryPoint("stream-final-message", stream_final, astream_final, stream_reply, OK, ALL_PLATFORMS),
    EntryPoint(
        "stream-left-early", stream_left_early, astream_left_early, stream_reply, INCOMPLETE, ALL_PLATFORMS
    ),
    EntryPoint(
        "create-stream-left-early",
        create_stream_left_early,
        acreate_stream_left_early,
        stream_reply,
        INCOMPLETE,
    ),
    EntryPoint(
        "stream-never-iterated", stream_never_iterated, astream_never_iterated, stream_reply, NOT_CONSUMED
    ),
    EntryPoint(
        "stream-helper-never-iterated",
        stream_helper_never_iterated,
        astream_helper_never_iterated,
        stream_reply,
        NOT_CONSUMED,
    ),
    EntryPoint("beta-create", beta_create, abeta_create, json_reply, OK, ALL_PLATFORMS),
    EntryPoint("beta-stream", beta_stream, abeta_stream, stream_reply, OK, ALL_PLATFORMS),
    EntryPoint("raw-create", raw_create, araw_create, json_reply, OK),
    EntryPoint("raw-create-parsed", raw_create_parsed, araw_create_parsed, json_reply, OK),
    EntryPoint("raw-stream", raw_stream, araw_stream, stream_reply, OK),
    EntryPoint("raw-stream-unparsed", raw_stream_unparsed, araw_stream_unparsed, stream_reply, NOT_CONSUMED),
    EntryPoint(
        "raw-stream-parsed-never-iterated",
        raw_stream_parsed_never_iterated,
        araw_stream_parsed_never_iterated,
        stream_reply,
        NOT_CONSUMED,
    ),
    EntryPoint("streaming-response", streaming_response_create, astreaming_response_create, json_reply, OK),
    EntryPoint(
        "streaming-response-unread",
        streaming_response_unread,
        astreaming_response_unread,
        json_reply,
        NOT_CONSUMED,
    ),
    EntryPoint(
        "streaming-response-stream", streaming_response_stream, astreaming_response_stream, stream_reply, OK
    ),
    EntryPoint(
        "streaming-response-iter-lines",
        streaming_response_lines,
        astreaming_response_lines,
        stream_reply,
        # Tokens were spent but their usage never passed through the SDK.
        Expect("not_consumed", NO_BUCKETS, None, flags="usage_unknown", has_response_id=False),
    ),
    EntryPoint(
        "retried-create",
        create,
        acreate,
        lambda: [Reply(status=529), Reply(usage=USAGE)],
        OK,
        ALL_PLATFORMS,
    ),
    EntryPoint(
        "retried-stream",
        create_stream,
        acreate_stream,
        lambda: [Reply(status=429), Reply(usage=START_USAGE, delta_usage=DELTA_USAGE)],
        OK,
        ALL_PLATFORMS,
    ),
    EntryPoint(
        "failed-after-retries",
        *create_raises(anthropic.InternalServerError),
        lambda: [Reply(status=500)] * 3,
        Expect("error", NO_BUCKETS, Decimal(0), error_type="InternalServerError", has_response_id=False),
        ALL_PLATFORMS,
    ),
    EntryPoint(
        "bad-request",
        *create_raises(anthropic.BadRequestError),
        lambda: [Reply(status=400)],
        Expect("error", NO_BUCKETS, Decimal(0), error_type="BadRequestError", has_response_id=False),
    ),
    EntryPoint(
        "stream-cut-by-server",
        create_stream,
        acreate_stream,
        lambda: [Reply(usage=START_USAGE, cut_before_delta=True)],
        INCOMPLETE,
        ALL_PLATFORMS,
    ),
    EntryPoint(
        "stream-error-event",
        *create_stream_raises(anthropic.APIStatusError),
        lambda: [Reply(usage=START_USAGE, sse_error_after_start=True)],
        Expect("error", START_BUCKETS, START_COST, error_type="APIStatusError"),
        ALL_PLATFORMS,
    ),
]

MATRIX = [
    pytest.param(entry, platform, is_async, id=f"{platform}-{'async' if is_async else 'sync'}-{entry.name}")
    for entry in ENTRY_POINTS
    for platform in entry.platforms
    for is_async in (False, True)
]


def run_entry_point(entry: EntryPoint, platform: str, is_async: bool, base_url: str) -> None:
    model = MODELS[platform]
    if is_async:

        async def run() -> None:
            async with make_client(platform, True, base_url) as client:
                await entry.acall(client, model)

        asyncio.run(run())
    else:
        with make_client(platform, False, base_url) as client:
            entry.call(client, model)


@pytest.mark.parametrize(("entry", "platform", "is_async"), MATRIX)
def test_entry_point_one_row(entry, platform, is_async, fake_api, recording, no_aws_metadata):
    replies = entry.replies()
    for reply in replies:
        fake_api.enqueue(reply)

    with attribute(**ATTRIBUTION):
        run_entry_point(entry, platform, is_async, fake_api.base_url)
    rows = recording.rows()

    # One HTTP request per scripted reply: a retried call really was retried.
    assert len(fake_api.requests) == len(replies)
    assert len(rows) == 1
    row = rows[0]
    expect = entry.expect
    assert row["status"] == expect.status
    assert buckets(row) == expect.buckets
    assert row["prompt_tokens"] == sum(expect.buckets[:4])
    assert row["completion_tokens"] == expect.buckets[4]
    assert row["cost_usd"] == (None if expect.cost is None else float(expect.cost))
    assert row["unpriced"] is (expect.cost is None)
    assert row["error_type"] == expect.error_type
    assert row["flags"] == expect.flags
    assert (row["response_id"] is not None) == expect.has_response_id
    assert row["provider"] == PROVIDERS[platform]
    assert row["model"] == MODELS[platform]
    assert row["request_model"] == MODELS[platform]
    assert row["price_id"] == (None if expect.cost is None else MODEL)
    assert row["service_tier"] == ("standard" if expect.buckets != NO_BUCKETS else None)
    assert (row["user_id"], row["feature"], row["request_id"]) == tuple(ATTRIBUTION.values())
    assert recording.counted_cost() == pytest.approx(float(expect.cost or 0), abs=1e-12)
    assert recording.counted_calls(expect.status) == 1


def test_matrix_covers_every_platform_and_mode():
    ids = {param.id for param in MATRIX}

    for platform in ALL_PLATFORMS:
        for mode in ("sync", "async"):
            assert f"{platform}-{mode}-create" in ids
            assert f"{platform}-{mode}-create-stream" in ids
            assert f"{platform}-{mode}-stream-final-message" in ids


# -- attribution at call time -----------------------------------------------------------------


def test_stream_read_later_call_attribution(fake_api, recording):
    fake_api.enqueue(Reply(usage=START_USAGE, delta_usage=DELTA_USAGE))

    with make_client("anthropic", False, fake_api.base_url) as client:
        with attribute(user_id="u-early", feature="digest"):
            stream = client.messages.create(**params(MODEL, stream=True))
        with attribute(user_id="u-late", feature="other"):
            for _event in stream:
                pass
    rows = recording.rows()

    assert len(rows) == 1
    assert rows[0]["user_id"] == "u-early"
    assert rows[0]["feature"] == "digest"
    assert rows[0]["status"] == "ok"


def test_async_stream_other_task_attribution(fake_api, recording):
    fake_api.enqueue(Reply(usage=START_USAGE, delta_usage=DELTA_USAGE))

    async def consume(stream) -> None:
        async for _event in stream:
            pass

    async def run() -> None:
        async with make_client("anthropic", True, fake_api.base_url) as client:
            with attribute(user_id="u-task", feature="report"):
                stream = await client.messages.create(**params(MODEL, stream=True))
            with attribute(user_id="u-other", feature="other"):
                await asyncio.create_task(consume(stream))

    asyncio.run(run())
    rows = recording.rows()

    assert len(rows) == 1
    assert rows[0]["user_id"] == "u-task"
    assert rows[0]["feature"] == "report"


def test_stream_dropped_mid_way_one_incomplete_row(fake_api, recording):
    fake_api.enqueue(Reply(usage=START_USAGE, delta_usage=DELTA_USAGE))

    with make_client("anthropic", False, fake_api.base_url) as client:
        stream = client.messages.create(**params(MODEL, stream=True))
        events = iter(stream)
        assert next(events).type == "message_start"
        # Dropping the last references closes the suspended generator.
        del events, stream
        gc.collect()
        rows = recording.rows()

    assert len(rows) == 1
    assert rows[0]["status"] == "incomplete"
    assert buckets(rows[0]) == START_BUCKETS


def test_invalid_usage_flagged_call_unharmed(fake_api, recording):
    fake_api.enqueue(Reply(usage={"input_tokens": -5, "output_tokens": 42}))

    with make_client("anthropic", False, fake_api.base_url) as client:
        message = client.messages.create(**params(MODEL))
    rows = recording.rows()

    assert message.usage.input_tokens == -5
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["flags"] == "usage_invalid"
    assert rows[0]["response_id"] == message.id


def test_invalid_delta_usage_stream_unharmed(fake_api, recording):
    fake_api.enqueue(Reply(usage=START_USAGE, delta_usage={"output_tokens": -1}))

    with make_client("anthropic", False, fake_api.base_url) as client:
        events = [event.type for event in client.messages.create(**params(MODEL, stream=True))]
    rows = recording.rows()

    assert events[-1] == "message_stop"
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["flags"] == "usage_invalid"
    # The usage read from message_start is kept.
    assert buckets(rows[0]) == START_BUCKETS


def test_count_tokens_writes_no_row(fake_api, recording):
    with make_client("anthropic", False, fake_api.base_url) as client:
        client.messages.count_tokens(model=MODEL, messages=MESSAGES)

    assert recording.rows() == []


# -- Message Batches --------------------------------------------------------------------------

BATCH_REQUESTS = [
    {"custom_id": "a", "params": params(MODEL)},
    {"custom_id": "b", "params": params(MODEL)},
    {"custom_id": "c", "params": params(MODEL + "-bad-request")},
]
# Half of FULL_COST on every bucket.
BATCH_COST = Decimal("0.0005925")


def download_results(base_url: str, batch_id: str) -> list[str]:
    with make_client("anthropic", False, base_url) as client:
        return [line.result.type for line in client.messages.batches.results(batch_id)]


def create_batch(fake_api) -> str:
    fake_api.set_model_usage(MODEL, USAGE)
    with make_client("anthropic", False, fake_api.base_url) as client:
        return client.messages.batches.create(requests=BATCH_REQUESTS).id


def assert_batch_rows(rows: list[dict[str, Any]]) -> None:
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "ok"
        assert buckets(row) == FULL_BUCKETS
        assert row["cost_usd"] == float(BATCH_COST)
        assert row["service_tier"] == "batch"
        assert row["provider"] == "anthropic"
        assert row["model"] == MODEL
    assert len({row["response_id"] for row in rows}) == 2


def test_batch_results_one_row_per_success(fake_api, recording):
    batch_id = create_batch(fake_api)

    with attribute(user_id="u-batch", feature="nightly"):
        kinds = download_results(fake_api.base_url, batch_id)
    rows = recording.rows()

    assert sorted(kinds) == ["errored", "succeeded", "succeeded"]
    assert_batch_rows(rows)
    assert {row["user_id"] for row in rows} == {"u-batch"}
    assert recording.counted_cost() == pytest.approx(float(BATCH_COST * 2), abs=1e-12)


def test_batch_results_async_one_row_per_success(fake_api, recording):
    batch_id = create_batch(fake_api)

    async def run() -> list[str]:
        async with make_client("anthropic", True, fake_api.base_url) as client:
            return [line.result.type async for line in await client.messages.batches.results(batch_id)]

    kinds = asyncio.run(run())

    assert sorted(kinds) == ["errored", "succeeded", "succeeded"]
    assert_batch_rows(recording.rows())


def test_beta_batch_results_one_row_per_success(fake_api, recording):
    fake_api.set_model_usage(MODEL, USAGE)

    with make_client("anthropic", False, fake_api.base_url) as client:
        batch = client.beta.messages.batches.create(requests=BATCH_REQUESTS)
        kinds = [line.result.type for line in client.beta.messages.batches.results(batch.id)]

    assert sorted(kinds) == ["errored", "succeeded", "succeeded"]
    assert_batch_rows(recording.rows())


def test_batch_results_downloaded_twice_same_tracker(fake_api, recording):
    batch_id = create_batch(fake_api)

    download_results(fake_api.base_url, batch_id)
    download_results(fake_api.base_url, batch_id)

    assert_batch_rows(recording.rows())
    # The tracker's window also keeps the counter from counting the repeat.
    assert recording.counted_cost() == pytest.approx(float(BATCH_COST * 2), abs=1e-12)


def test_batch_results_second_tracker_no_duplicates(fake_api, recording, tmp_path):
    batch_id = create_batch(fake_api)
    download_results(fake_api.base_url, batch_id)
    first_rows = recording.rows()

    # A second tracker on the same database has an empty in-process window,
    # so only the store's unique index on response_id stops the repeat.
    second_store = Store(f"sqlite:///{recording.db_path}")
    second_recorder = Recorder(
        second_store, spill_path=tmp_path / "spill-2.jsonl", flush_interval_seconds=0.05
    )
    instrument(store=second_store, recorder=second_recorder, metrics=Metrics(CollectorRegistry()))
    try:
        download_results(fake_api.base_url, batch_id)
        assert second_recorder.flush(timeout_seconds=10)
    finally:
        second_recorder.close(timeout_seconds=2.0)
        second_store.dispose()

    assert_batch_rows(recording.store.fetch_events())
    assert first_rows == recording.store.fetch_events()


SECOND_PROCESS = """
import sys
import anthropic
from llmcost_mw import instrument, uninstrument
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store

base_url, database, spill, batch_id = sys.argv[1:]
store = Store("sqlite:///" + database)
recorder = Recorder(store, spill_path=spill, flush_interval_seconds=0.05)
instrument(store=store, recorder=recorder, registry=None)
with anthropic.Anthropic(api_key="test", base_url=base_url, max_retries=0) as client:
    kinds = [line.result.type for line in client.messages.batches.results(batch_id)]
uninstrument()
recorder.close()
# Lines read, and events handed to the store (whether or not it kept them).
print(len(kinds), recorder.written)
"""


def test_batch_results_second_process_no_duplicates(fake_api, recording, tmp_path):
    batch_id = create_batch(fake_api)
    download_results(fake_api.base_url, batch_id)
    assert len(recording.rows()) == 2

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            SECOND_PROCESS,
            fake_api.base_url,
            str(recording.db_path),
            str(tmp_path / "spill-process.jsonl"),
            batch_id,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )

    assert result.returncode == 0, result.stderr
    lines_read, events_written = result.stdout.split()
    assert lines_read == "3"
    # The second process did try to write both rows; the store kept neither.
    assert events_written == "2"
    assert_batch_rows(recording.store.fetch_events())


# -- response id deduplication on the live path -----------------------------------------------


def test_same_response_id_twice_one_row(fake_api, recording):
    fake_api.enqueue(Reply(usage=USAGE, id="msg_repeated"))
    fake_api.enqueue(Reply(usage=USAGE, id="msg_repeated"))

    with make_client("anthropic", False, fake_api.base_url) as client:
        create(client, MODEL)
        create(client, MODEL)
    rows = recording.rows()

    assert len(rows) == 1
    assert rows[0]["response_id"] == "msg_repeated"
    assert recording.counted_cost() == pytest.approx(float(FULL_COST), abs=1e-12)
