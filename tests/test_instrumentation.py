"""The real anthropic SDK, served by an in-process mock transport, recorded through `instrument()`."""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal

import anthropic
import httpx2
import pytest
from prometheus_client import CollectorRegistry

from llmcost_mw import UnpricedModelError, attribute, current_tracker, instrument, tracked_create
from llmcost_mw.tracker import UNPRICED_WARNING

MODEL = "claude-sonnet-4-5-20250929"
UNKNOWN_MODEL = "claude-sonnet-4-9-20270101"
MESSAGES = [{"role": "user", "content": "Summarize this."}]
USAGE = {
    "input_tokens": 10,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40},
    "output_tokens": 42,
}
# Sonnet 4.5 at $3 input, $3.75 and $6 cache writes, $0.30 read, $15 output per million:
# 10*3 + 60*3.75 + 40*6 + 200*0.30 + 42*15 = 1185 micro-dollars.
USAGE_COST = 0.001185


def message_body(*, message_id="msg_1", model=MODEL, usage=None) -> dict:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "A summary."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage if usage is not None else USAGE,
    }


def json_reply(body, *, status=200, headers=None):
    def reply(request):
        return httpx2.Response(status, json=body, headers=headers)

    return reply


def stream_events(*, message_id="msg_s1", model=MODEL, start_usage=None, delta_usage=None) -> list[dict]:
    """Return the events of one streamed message. The delta usage contains cumulative totals."""
    start_usage = start_usage or {**USAGE, "output_tokens": 1}
    delta_usage = delta_usage or {"output_tokens": 42, "input_tokens": 10, "cache_read_input_tokens": 200}
    message = {**message_body(message_id=message_id, model=model, usage=start_usage), "content": []}
    message["stop_reason"] = None
    return [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "A "}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "summary."}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": delta_usage,
        },
        {"type": "message_stop"},
    ]


def sse_reply(events):
    # The SDK drops frames without an `event:` line, so every frame names its event.
    body = "".join(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events)

    def reply(request):
        return httpx2.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})

    return reply


def create(client, model=MODEL, **kwargs):
    return client.messages.create(model=model, max_tokens=100, messages=MESSAGES, **kwargs)


def rows_after_flush(tracker):
    assert tracker.recorder.flush(timeout_seconds=10)
    return tracker.recorder.store.fetch_events()


def sample(registry, name, **labels):
    """Read a sample as a scrape would: calls queued but not yet counted are counted first."""
    tracker = current_tracker()
    if tracker is not None:
        tracker.process_pending()
    return registry.get_sample_value(name, labels) or 0.0


def test_create_one_row(tracker, api):
    client = api.client(json_reply(message_body()))

    with attribute(user_id="u1", feature="summarize", request_id="req-1"):
        create(client)
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    row = rows[0]
    assert row["user_id"] == "u1"
    assert row["feature"] == "summarize"
    assert row["request_id"] == "req-1"
    assert row["response_id"] == "msg_1"
    assert row["status"] == "ok"
    assert row["model"] == MODEL
    assert row["provider"] == "anthropic"
    assert row["context_missing"] is False


def test_usage_parsed_off_caller_thread(tracker, api, monkeypatch):
    import threading

    from llmcost_mw.providers import anthropic as hooks

    parsed_on = []
    parse = hooks.usage_from_anthropic

    def noting_parse(usage):
        parsed_on.append(threading.current_thread().name)
        return parse(usage)

    monkeypatch.setattr(hooks, "usage_from_anthropic", noting_parse)
    client = api.client(json_reply(message_body()))

    create(client)
    rows = rows_after_flush(tracker)

    assert parsed_on == ["llmcost-recorder"]
    assert rows[0]["cost_usd"] == pytest.approx(USAGE_COST)
    assert rows[0]["prompt_tokens"] == 310


@pytest.mark.parametrize(
    "usage_json",
    [
        pytest.param('{"input_tokens": 1e400, "output_tokens": 5}', id="overflowing-float"),
        pytest.param('{"input_tokens": 100000000000000000000, "output_tokens": 5}', id="over-64-bits"),
        pytest.param('{"input_tokens": 3.7, "output_tokens": 5}', id="fraction"),
        pytest.param('{"input_tokens": true, "output_tokens": 5}', id="boolean"),
        pytest.param('"ten tokens"', id="string"),
        pytest.param("[10, 5]", id="list"),
    ],
)
@pytest.mark.parametrize("strict", [False, True], ids=["lax", "strict"])
def test_broken_usage_flagged_not_lost(tracker, api, usage_json, strict):
    tracker.strict = strict
    replies = iter(range(2))

    def reply(request):
        body = json.dumps(message_body(message_id=f"msg_{next(replies)}"))
        body = body.replace(json.dumps(USAGE), usage_json)
        return httpx2.Response(200, content=body.encode(), headers={"content-type": "application/json"})

    client = api.client(reply)

    create(client)
    create(client)  # a later call is still written
    rows = rows_after_flush(tracker)

    assert len(rows) == 2
    assert rows[0]["flags"] == "usage_invalid"
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (0, 0)
    assert rows[0]["cost_usd"] is None
    assert rows[0]["unpriced"] is True


def test_create_row_buckets_and_cost(tracker, api):
    client = api.client(json_reply(message_body()))

    with attribute(user_id="u1"):
        create(client)
    row = rows_after_flush(tracker)[0]

    assert row["input_tokens"] == 10
    assert row["cache_write_5m_tokens"] == 60
    assert row["cache_write_1h_tokens"] == 40
    assert row["cache_read_tokens"] == 200
    assert row["output_tokens"] == 42
    assert row["prompt_tokens"] == 310
    assert row["completion_tokens"] == 42
    assert row["cost_usd"] == pytest.approx(USAGE_COST, rel=1e-12)
    assert row["unpriced"] is False
    assert row["latency_ms"] > 0


def test_create_outside_scope_context_missing(tracker, api):
    client = api.client(json_reply(message_body()))

    create(client)
    row = rows_after_flush(tracker)[0]

    assert row["context_missing"] is True
    assert row["user_id"] is None


def test_count_tokens_not_recorded(tracker, api):
    client = api.client(json_reply({"input_tokens": 12}))

    client.messages.count_tokens(model=MODEL, messages=MESSAGES)

    assert rows_after_flush(tracker) == []


def test_stream_true_one_row(tracker, api):
    client = api.client(sse_reply(stream_events()))

    with attribute(user_id="u1", feature="chat"):
        stream = create(client, stream=True)
        events = list(stream)
    rows = rows_after_flush(tracker)

    assert len(events) == 7
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["response_id"] == "msg_s1"
    assert rows[0]["user_id"] == "u1"


def test_stream_delta_replaces_usage(tracker, api):
    client = api.client(sse_reply(stream_events()))

    for _event in create(client, stream=True):
        pass
    row = rows_after_flush(tracker)[0]

    assert row["output_tokens"] == 42
    assert row["input_tokens"] == 10
    assert row["cache_read_tokens"] == 200
    assert row["cache_write_5m_tokens"] == 60
    assert row["cache_write_1h_tokens"] == 40
    assert row["cost_usd"] == pytest.approx(USAGE_COST, rel=1e-12)


def test_stream_helper_one_row(tracker, api):
    client = api.client(sse_reply(stream_events()))

    with attribute(user_id="u2", feature="chat"):
        with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
            final = stream.get_final_message()
    rows = rows_after_flush(tracker)

    assert final.usage.output_tokens == 42
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["output_tokens"] == 42
    assert rows[0]["input_tokens"] == 10
    assert rows[0]["user_id"] == "u2"


def test_stream_keeps_attribution_of_call(tracker, api):
    client = api.client(sse_reply(stream_events()))

    with attribute(user_id="u3"):
        stream = create(client, stream=True)
    for _event in stream:
        pass
    row = rows_after_flush(tracker)[0]

    assert row["user_id"] == "u3"


def test_stream_left_early_incomplete(tracker, api):
    client = api.client(sse_reply(stream_events()))

    stream = create(client, stream=True)
    for event in stream:
        if event.type == "content_block_delta":
            break
    stream.close()
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == "incomplete"
    assert rows[0]["output_tokens"] == 1
    assert rows[0]["input_tokens"] == 10


def test_stream_helper_left_early_incomplete(tracker, api):
    client = api.client(sse_reply(stream_events()))

    with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == "incomplete"


def test_stream_cut_before_delta_incomplete(tracker, api):
    # The server closes the connection after the text, before message_delta.
    client = api.client(sse_reply(stream_events()[:4]))

    events = list(create(client, stream=True))
    rows = rows_after_flush(tracker)

    assert len(events) == 4
    assert len(rows) == 1
    assert rows[0]["status"] == "incomplete"
    assert rows[0]["output_tokens"] == 1


def test_async_stream_left_early_incomplete(tracker, api):
    client = api.async_client(sse_reply(stream_events(message_id="msg_as3")))

    async def call():
        stream = await create(client, stream=True)
        async for event in stream:
            if event.type == "content_block_delta":
                break
        await stream.close()

    asyncio.run(call())
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == "incomplete"
    assert rows[0]["input_tokens"] == 10


def test_stream_never_read_not_consumed(tracker, api):
    client = api.client(sse_reply(stream_events()))

    stream = create(client, stream=True)
    stream.close()
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == "not_consumed"


@pytest.mark.parametrize("iterated", [False, True], ids=["never-iterated", "iterated-part-way"])
def test_stream_dropped_recorded_once(tracker, api, iterated):
    import gc

    client = api.client(sse_reply(stream_events()))

    stream = create(client, stream=True)
    if iterated:
        next(iter(stream))
    del stream
    gc.collect()
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == ("incomplete" if iterated else "not_consumed")


def test_stream_error_event_error_row(tracker, api):
    events = stream_events()[:3]
    events.append({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    client = api.client(sse_reply(events))

    with pytest.raises(anthropic.APIStatusError):
        for _event in create(client, stream=True):
            pass
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["status"] == "error"
    assert rows[0]["input_tokens"] == 10


def test_raw_response_one_row(tracker, api):
    client = api.client(json_reply(message_body(message_id="msg_raw")))

    with attribute(feature="raw"):
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    rows = rows_after_flush(tracker)

    assert raw.http_response.status_code == 200
    assert len(rows) == 1
    assert rows[0]["response_id"] == "msg_raw"
    assert rows[0]["output_tokens"] == 42
    assert rows[0]["feature"] == "raw"


def test_raw_response_parse_still_one_row(tracker, api):
    client = api.client(json_reply(message_body(message_id="msg_raw2")))

    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    message = raw.parse()
    rows = rows_after_flush(tracker)

    assert message.id == "msg_raw2"
    assert len(rows) == 1


def test_async_create_one_row(tracker, api):
    client = api.async_client(json_reply(message_body(message_id="msg_a1")))

    async def call():
        with attribute(user_id="async-user", feature="async"):
            return await create(client)

    asyncio.run(call())
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["user_id"] == "async-user"
    assert rows[0]["feature"] == "async"
    assert rows[0]["response_id"] == "msg_a1"
    assert rows[0]["output_tokens"] == 42


def test_async_stream_one_row(tracker, api):
    client = api.async_client(sse_reply(stream_events(message_id="msg_as1")))

    async def call():
        with attribute(user_id="async-user"):
            async with client.messages.stream(model=MODEL, max_tokens=100, messages=MESSAGES) as stream:
                return await stream.get_final_message()

    final = asyncio.run(call())
    rows = rows_after_flush(tracker)

    assert final.usage.output_tokens == 42
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["output_tokens"] == 42
    assert rows[0]["input_tokens"] == 10
    assert rows[0]["user_id"] == "async-user"


def test_async_stream_true_one_row(tracker, api):
    client = api.async_client(sse_reply(stream_events(message_id="msg_as2")))

    async def call():
        stream = await create(client, stream=True)
        return [event async for event in stream]

    events = asyncio.run(call())
    rows = rows_after_flush(tracker)

    assert len(events) == 7
    assert len(rows) == 1
    assert rows[0]["output_tokens"] == 42


def overloaded_then_ok(request):
    if request.headers.get("x-stainless-retry-count", "0") == "0":
        return httpx2.Response(
            529,
            json={"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            headers={"retry-after-ms": "1"},
        )
    return httpx2.Response(200, json=message_body(message_id="msg_retry"))


def test_retry_then_ok_one_row(tracker, api):
    client = api.client(overloaded_then_ok, max_retries=2)

    with attribute(user_id="u1"):
        create(client)
    rows = rows_after_flush(tracker)

    assert len(api.requests) == 2
    assert len(rows) == 1
    assert rows[0]["status"] == "ok"
    assert rows[0]["response_id"] == "msg_retry"
    assert rows[0]["user_id"] == "u1"


def server_error(request):
    return httpx2.Response(
        500,
        json={"type": "error", "error": {"type": "api_error", "message": "Internal"}},
        headers={"retry-after-ms": "1"},
    )


def test_three_500s_one_error_row(tracker, api):
    client = api.client(server_error, max_retries=2)

    with attribute(user_id="u1"):
        with pytest.raises(anthropic.InternalServerError):
            create(client)
    rows = rows_after_flush(tracker)

    assert len(api.requests) == 3
    assert len(rows) == 1
    assert rows[0]["status"] == "error"
    assert rows[0]["error_type"] == "InternalServerError"
    assert rows[0]["user_id"] == "u1"
    assert rows[0]["prompt_tokens"] == 0


def test_bad_request_one_error_row(tracker, api):
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    client = api.client(json_reply(body, status=400), max_retries=2)

    with pytest.raises(anthropic.BadRequestError):
        create(client)
    rows = rows_after_flush(tracker)

    assert len(api.requests) == 1
    assert len(rows) == 1
    assert rows[0]["error_type"] == "BadRequestError"


def test_error_row_counted_in_metrics(tracker, api, registry):
    client = api.client(server_error, max_retries=0)

    with pytest.raises(anthropic.InternalServerError):
        create(client)

    labels = {"provider": "anthropic", "model": MODEL, "feature": "unknown", "status": "error"}
    assert sample(registry, "llmcost_calls_total", **labels) == 1.0


def test_same_response_id_one_row(tracker, api, registry):
    client = api.client(json_reply(message_body(message_id="msg_dup")))

    create(client)
    create(client)
    rows = rows_after_flush(tracker)

    assert len(api.requests) == 2
    assert len(rows) == 1
    labels = {"provider": "anthropic", "model": MODEL, "feature": "unknown", "status": "ok"}
    assert sample(registry, "llmcost_calls_total", **labels) == 1.0


def test_tracked_create_sync(tracker, api):
    client = api.client(json_reply(message_body(message_id="msg_t1")))

    tracked_create(client, feature="digest", user_id="u9", model=MODEL, max_tokens=100, messages=MESSAGES)
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["feature"] == "digest"
    assert rows[0]["user_id"] == "u9"
    assert rows[0]["context_missing"] is False


def test_tracked_create_async(tracker, api):
    client = api.async_client(json_reply(message_body(message_id="msg_t2")))

    async def call():
        return await tracked_create(
            client, feature="digest", user_id="u10", model=MODEL, max_tokens=100, messages=MESSAGES
        )

    message = asyncio.run(call())
    rows = rows_after_flush(tracker)

    assert message.id == "msg_t2"
    assert len(rows) == 1
    assert rows[0]["feature"] == "digest"
    assert rows[0]["user_id"] == "u10"
    assert rows[0]["context_missing"] is False


def test_tracked_create_needs_attribution(tracker, api):
    client = api.client(json_reply(message_body()))

    with pytest.raises(ValueError, match="feature="):
        tracked_create(client, model=MODEL, max_tokens=100, messages=MESSAGES)


def test_unknown_model_row_unpriced(tracker, api):
    client = api.client(json_reply(message_body(model=UNKNOWN_MODEL)))

    create(client, model=UNKNOWN_MODEL)
    rows = rows_after_flush(tracker)

    assert len(rows) == 1
    assert rows[0]["cost_usd"] is None
    assert rows[0]["unpriced"] is True
    assert rows[0]["model"] == UNKNOWN_MODEL
    assert rows[0]["price_version"] == tracker.price_book.version


def test_unknown_model_warns_once_counts_each(tracker, api, registry, caplog):
    replies = [json_reply(message_body(message_id=f"msg_u{i}", model=UNKNOWN_MODEL)) for i in range(3)]
    client = api.client(*replies)

    with caplog.at_level(logging.WARNING, logger="llmcost_mw"):
        for _ in range(3):
            create(client, model=UNKNOWN_MODEL)
    rows = rows_after_flush(tracker)

    warnings = [record for record in caplog.records if record.msg == UNPRICED_WARNING]
    assert len(warnings) == 1
    assert UNKNOWN_MODEL in warnings[0].getMessage()
    assert len(rows) == 3
    assert sample(registry, "llmcost_unpriced_calls_total", provider="anthropic", model=UNKNOWN_MODEL) == 3.0


def test_strict_raises_and_writes_row(tracker, api):
    instrument(store=tracker.recorder.store, recorder=tracker.recorder, metrics=tracker.metrics, strict=True)
    client = api.client(json_reply(message_body(message_id="msg_strict", model=UNKNOWN_MODEL)))

    with pytest.raises(UnpricedModelError) as excinfo:
        create(client, model=UNKNOWN_MODEL)
    rows = rows_after_flush(tracker)

    assert excinfo.value.model == UNKNOWN_MODEL
    assert len(rows) == 1
    assert rows[0]["response_id"] == "msg_strict"
    assert rows[0]["unpriced"] is True


def test_strict_priced_model_no_raise(tracker, api):
    instrument(store=tracker.recorder.store, recorder=tracker.recorder, metrics=tracker.metrics, strict=True)
    client = api.client(json_reply(message_body()))

    message = create(client)

    assert message.id == "msg_1"


def test_cost_counter_equals_row_sum(tracker, api, registry):
    cheap = {"input_tokens": 4, "cache_read_input_tokens": 2455, "output_tokens": 23}
    replies = [
        json_reply(message_body(message_id="msg_c1")),
        json_reply(message_body(message_id="msg_c2", model="claude-3-5-haiku-20241022", usage=cheap)),
        json_reply(message_body(message_id="msg_c3", model=UNKNOWN_MODEL)),
        json_reply(message_body(message_id="msg_c4")),
    ]
    client = api.client(*replies)

    for feature, model in [
        ("a", MODEL),
        ("b", "claude-3-5-haiku-20241022"),
        ("a", UNKNOWN_MODEL),
        ("c", MODEL),
    ]:
        with attribute(feature=feature):
            create(client, model=model)
    rows = rows_after_flush(tracker)

    row_sum = sum(row["cost_usd"] for row in rows if row["cost_usd"] is not None)
    counter_sum = sum(
        metric_sample.value
        for metric in registry.collect()
        if metric.name == "llmcost_cost_usd"
        for metric_sample in metric.samples
        if metric_sample.name == "llmcost_cost_usd_total"
    )
    assert len(rows) == 4
    assert row_sum == pytest.approx(2 * USAGE_COST + 0.0002916, rel=1e-12)
    assert counter_sum == pytest.approx(row_sum, rel=1e-12)


def test_cost_stored_matches_decimal(tracker, api):
    client = api.client(json_reply(message_body()))

    create(client)
    row = rows_after_flush(tracker)[0]

    assert Decimal(str(row["cost_usd"])) == Decimal("0.001185")


def test_instrument_metrics_in_each_new_registry(tracker):
    # Registries that are made and dropped one after another often reuse a
    # memory address, and so an id(). Each must still get its own metrics.
    missing = 0
    for _ in range(20):
        registry = CollectorRegistry()
        instrument(recorder=tracker.recorder, registry=registry)
        names = {metric.name for metric in registry.collect()}
        if "llmcost_cost_usd" not in names:
            missing += 1
        del registry

    assert missing == 0
