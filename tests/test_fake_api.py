"""Run the real anthropic SDK against the local fake Anthropic API."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import anthropic
import pytest
from anthropic import AnthropicBedrock, AnthropicVertex, AsyncAnthropic

from llmcost_mw.demo.fake_api import FakeAnthropicAPI, Reply, encode_bedrock_event

MODEL = "claude-3-5-haiku-20241022"
USER_MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]
SCRIPTED_USAGE = {
    "input_tokens": 120,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "cache_creation": {"ephemeral_5m_input_tokens": 60, "ephemeral_1h_input_tokens": 40},
    "output_tokens": 1,
    "service_tier": "standard",
}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Look up the weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}


@pytest.fixture
def fake_api():
    with FakeAnthropicAPI() as server:
        yield server


@pytest.fixture
def client(fake_api):
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=2, timeout=10) as sdk_client:
        yield sdk_client


@pytest.fixture
def no_aws_metadata(monkeypatch):
    # Explicit keys already keep botocore away from the instance metadata service. This is a second guard.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def create(client, model=MODEL, **kwargs):
    kwargs.setdefault("messages", USER_MESSAGES)
    return client.messages.create(model=model, max_tokens=256, **kwargs)


# -- JSON and SSE messages ------------------------------------------------------


def test_create_reports_scripted_usage(fake_api, client):
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE, content=[{"type": "text", "text": "scripted"}]))

    message = create(client)

    assert message.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE
    assert message.content[0].text == "scripted"
    assert message.stop_reason == "end_turn"
    assert message.model == MODEL
    assert message.id.startswith("msg_")


def test_stream_start_and_delta_usage(fake_api, client):
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE, delta_usage={"output_tokens": 42}))

    events = list(create(client, stream=True))

    types = [event.type for event in events]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in types
    assert events[0].message.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE
    assert events[-2].usage.output_tokens == 42
    assert events[-2].delta.stop_reason == "end_turn"


def test_stream_helper_final_usage(fake_api, client):
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE, delta_usage={"output_tokens": 42}))

    with client.messages.stream(model=MODEL, max_tokens=256, messages=USER_MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()

    assert text
    assert final.usage.output_tokens == 42
    assert final.usage.input_tokens == 120
    assert final.usage.cache_read_input_tokens == 200
    assert final.stop_reason == "end_turn"


def test_default_usage_is_deterministic(client):
    first = create(client)
    second = create(client)

    prompt_characters = len(USER_MESSAGES[0]["content"])
    assert first.usage.input_tokens == prompt_characters // 4
    assert first.usage.output_tokens == second.usage.output_tokens
    assert 20 <= first.usage.output_tokens <= 80
    assert first.usage.cache_creation_input_tokens == 0
    assert first.usage.cache_read_input_tokens == 0
    assert first.id != second.id


def test_default_stream_matches_json(client):
    json_usage = create(client).usage

    with client.messages.stream(model=MODEL, max_tokens=256, messages=USER_MESSAGES) as stream:
        start_events = [event for event in stream if event.type == "message_start"]
        final = stream.get_final_message()

    assert start_events[0].message.usage.output_tokens == 1
    assert final.usage.output_tokens == json_usage.output_tokens
    assert final.usage.input_tokens == json_usage.input_tokens


def test_max_tokens_caps_output(client):
    message = client.messages.create(model=MODEL, max_tokens=3, messages=USER_MESSAGES)

    assert message.usage.output_tokens == 3
    assert message.stop_reason == "max_tokens"


def test_cached_system_writes_then_reads(client):
    system = [
        {"type": "text", "text": "A" * 400, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "B" * 800, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "uncached tail " * 4},
    ]

    first = create(client, system=system)
    second = create(client, system=system)

    assert first.usage.cache_creation_input_tokens == 300
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == 100
    assert first.usage.cache_creation.ephemeral_1h_input_tokens == 200
    assert first.usage.cache_read_input_tokens == 0
    assert second.usage.cache_creation_input_tokens == 0
    assert second.usage.cache_read_input_tokens == 300
    assert second.usage.input_tokens == first.usage.input_tokens


def test_set_model_usage_every_call(fake_api, client):
    fake_api.set_model_usage(MODEL, SCRIPTED_USAGE)

    message = create(client)
    with client.messages.stream(model=MODEL, max_tokens=256, messages=USER_MESSAGES) as stream:
        final = stream.get_final_message()

    assert message.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE
    assert final.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE


def test_enqueued_replies_fifo_order(fake_api, client):
    fake_api.enqueue(Reply(usage={"input_tokens": 1, "output_tokens": 2}, id="msg_first"))
    fake_api.enqueue(Reply(usage={"input_tokens": 3, "output_tokens": 4}, model="claude-echo"))

    first = create(client)
    second = create(client)
    third = create(client)

    assert (first.id, first.usage.output_tokens) == ("msg_first", 2)
    assert (second.model, second.usage.input_tokens) == ("claude-echo", 3)
    assert third.model == MODEL


def test_tool_use_loop_three_calls(fake_api, client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    stop_reasons = []

    for _ in range(5):
        message = client.messages.create(model=MODEL, max_tokens=256, tools=[WEATHER_TOOL], messages=messages)
        stop_reasons.append(message.stop_reason)
        if message.stop_reason != "tool_use":
            break
        tool_use = message.content[0]
        assert tool_use.type == "tool_use"
        assert tool_use.name == "get_weather"
        assert tool_use.input == {"city": "demo", "days": 1}
        messages.append({"role": "assistant", "content": message.content})
        tool_result = {"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}
        messages.append({"role": "user", "content": [tool_result]})

    assert stop_reasons == ["tool_use", "tool_use", "end_turn"]
    assert len(fake_api.requests_to("/v1/messages")) == 3


def test_tool_use_stream_sends_input_json(client):
    with client.messages.stream(model=MODEL, max_tokens=256, tools=[WEATHER_TOOL], messages=USER_MESSAGES) as stream:
        delta_types = {event.delta.type for event in stream if event.type == "content_block_delta"}
        final = stream.get_final_message()

    assert delta_types == {"input_json_delta"}
    assert final.stop_reason == "tool_use"
    assert final.content[0].input == {"city": "demo", "days": 1}


# -- errors and retries ------------------------------------------------------------


def test_overloaded_once_is_retried(fake_api, client):
    message = create(client, model=MODEL + "-overloaded-once")

    requests = fake_api.requests_to("/v1/messages")
    assert message.stop_reason == "end_turn"
    assert len(requests) == 2
    assert [request.headers["x-stainless-retry-count"] for request in requests] == ["0", "1"]


def test_overloaded_once_stream_is_retried(fake_api, client):
    with client.messages.stream(model=MODEL + "-overloaded-once", max_tokens=64, messages=USER_MESSAGES) as stream:
        final = stream.get_final_message()

    assert final.stop_reason is not None
    assert len(fake_api.requests_to("/v1/messages")) == 2


def test_always_500_raises_after_three_attempts(fake_api, client):
    started = time.monotonic()
    with pytest.raises(anthropic.InternalServerError) as raised:
        create(client, model=MODEL + "-always-500")

    assert raised.value.status_code == 500
    assert raised.value.body["error"]["type"] == "api_error"
    assert len(fake_api.requests_to("/v1/messages")) == 3
    # retry-after-ms: 1 replaces the SDK's 0.5 s and 1 s backoff.
    assert time.monotonic() - started < 1.0


def test_bad_request_is_not_retried(fake_api, client):
    with pytest.raises(anthropic.BadRequestError) as raised:
        create(client, model=MODEL + "-bad-request")

    assert raised.value.body["error"]["type"] == "invalid_request_error"
    assert len(fake_api.requests) == 1


def test_scripted_error_then_success(fake_api, client):
    fake_api.enqueue(Reply(status=429, error_message="slow down"))
    fake_api.enqueue(Reply(usage={"input_tokens": 5, "output_tokens": 6}))

    message = create(client)

    assert message.usage.output_tokens == 6
    assert len(fake_api.requests) == 2


def test_missing_max_tokens_is_rejected(fake_api, client):
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.post("/v1/messages", body={"model": MODEL, "messages": USER_MESSAGES}, cast_to=object)

    assert "max_tokens" in raised.value.body["error"]["message"]


def test_cut_stream_has_no_message_stop(client):
    events = list(create(client, model=MODEL + "-cut-stream", stream=True))

    types = [event.type for event in events]
    assert types[0] == "message_start"
    assert "content_block_delta" in types
    assert "message_delta" not in types
    assert "message_stop" not in types


def test_cut_stream_final_message_is_incomplete(fake_api, client):
    fake_api.enqueue(Reply(usage=dict(SCRIPTED_USAGE), cut_before_delta=True))

    with client.messages.stream(model=MODEL, max_tokens=256, messages=USER_MESSAGES) as stream:
        final = stream.get_final_message()

    assert final.stop_reason is None
    assert final.usage.output_tokens == 1


def test_sse_error_raises_api_status_error(client):
    stream = create(client, model=MODEL + "-sse-error", stream=True)
    seen = []

    with pytest.raises(anthropic.APIStatusError) as raised:
        for event in stream:
            seen.append(event.type)

    assert seen == ["message_start"]
    assert raised.value.body["error"]["type"] == "overloaded_error"


def test_delay_past_timeout_raises(fake_api):
    fake_api.enqueue(Reply(delay_seconds=1.0))
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=0, timeout=0.2) as sdk_client:
        with pytest.raises(anthropic.APITimeoutError):
            create(sdk_client)


# -- other endpoints ----------------------------------------------------------------


def test_count_tokens_returns_estimate(fake_api, client):
    system = [{"type": "text", "text": "S" * 80, "cache_control": {"type": "ephemeral"}}]

    counted = client.messages.count_tokens(model=MODEL, messages=USER_MESSAGES, system=system)

    assert counted.input_tokens == (80 + len(USER_MESSAGES[0]["content"])) // 4
    assert fake_api.requests[-1].path == "/v1/messages/count_tokens"


def test_batch_results_succeeded_and_errored(fake_api, client):
    requests = [
        {"custom_id": "ok", "params": {"model": MODEL, "max_tokens": 64, "messages": USER_MESSAGES}},
        {"custom_id": "bad", "params": {"model": MODEL + "-bad-request", "max_tokens": 64, "messages": USER_MESSAGES}},
    ]

    batch = client.messages.batches.create(requests=requests)
    retrieved = client.messages.batches.retrieve(batch.id)
    lines = {line.custom_id: line for line in client.messages.batches.results(batch.id)}

    assert batch.processing_status == "ended"
    assert retrieved.id == batch.id
    assert retrieved.request_counts.succeeded == 1
    assert retrieved.request_counts.errored == 1
    assert retrieved.results_url.startswith(fake_api.base_url)
    assert lines["ok"].result.type == "succeeded"
    assert lines["ok"].result.message.usage.output_tokens > 0
    assert lines["ok"].result.message.usage.service_tier == "batch"
    assert lines["bad"].result.type == "errored"
    assert lines["bad"].result.error.error.type == "invalid_request_error"


def test_batch_list_and_unknown_batch(client):
    batch = client.messages.batches.create(
        requests=[{"custom_id": "a", "params": {"model": MODEL, "max_tokens": 8, "messages": USER_MESSAGES}}]
    )

    listed = [item.id for item in client.messages.batches.list()]

    assert listed == [batch.id]
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve("msgbatch_missing")


def test_unknown_path_returns_404_json(fake_api):
    connection = http.client.HTTPConnection("127.0.0.1", fake_api.port, timeout=5)
    connection.request("GET", "/v1/nothing-here")
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()

    assert response.status == 404
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"


def test_json_replies_keep_connection_alive(fake_api):
    connection = http.client.HTTPConnection("127.0.0.1", fake_api.port, timeout=5)
    payload = json.dumps({"model": MODEL, "max_tokens": 16, "messages": USER_MESSAGES})
    statuses = []
    sockets = []
    for _ in range(3):
        connection.request("POST", "/v1/messages", body=payload, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        statuses.append(response.status)
        sockets.append(connection.sock)
    connection.close()

    assert statuses == [200, 200, 200]
    # http.client drops its socket after a reply that closes the connection, so one socket means reuse.
    assert sockets[0] is not None
    assert all(sock is sockets[0] for sock in sockets)
    assert len(fake_api.requests) == 3


# -- async client ----------------------------------------------------------------------


def test_async_client_create_and_stream(fake_api):
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE))
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE, delta_usage={"output_tokens": 42}))

    async def run():
        async with AsyncAnthropic(api_key="test", base_url=fake_api.base_url, max_retries=2) as async_client:
            message = await async_client.messages.create(model=MODEL, max_tokens=64, messages=USER_MESSAGES)
            async with async_client.messages.stream(model=MODEL, max_tokens=64, messages=USER_MESSAGES) as stream:
                final = await stream.get_final_message()
            retried = await async_client.messages.create(
                model=MODEL + "-overloaded-once", max_tokens=64, messages=USER_MESSAGES
            )
            return message, final, retried

    message, final, retried = asyncio.run(run())

    assert message.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE
    assert final.usage.output_tokens == 42
    assert retried.stop_reason == "end_turn"
    assert len(fake_api.requests) == 4


# -- Bedrock and Vertex -------------------------------------------------------------------


def bedrock_client(fake_api):
    return AnthropicBedrock(
        base_url=fake_api.base_url, aws_region="us-east-1", aws_access_key="x", aws_secret_key="y", max_retries=2
    )


def test_bedrock_eventstream_frames_decode():
    from anthropic.lib.bedrock._stream_decoder import AWSEventStreamDecoder

    frames = encode_bedrock_event("message_stop", {"type": "message_stop"})
    frames += encode_bedrock_event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}})

    # Feed the bytes in uneven pieces, as a socket may deliver them.
    events = list(AWSEventStreamDecoder().iter_bytes(iter([frames[:5], frames[5:40], frames[40:]])))

    assert [event.event for event in events] == ["message_stop", "error"]
    assert json.loads(events[1].data)["error"]["message"] == "x"


def test_bedrock_create_and_stream(fake_api, no_aws_metadata):
    model = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE))
    fake_api.enqueue(Reply(usage=SCRIPTED_USAGE, delta_usage={"output_tokens": 42}))

    with bedrock_client(fake_api) as sdk_client:
        message = sdk_client.messages.create(model=model, max_tokens=64, messages=USER_MESSAGES)
        with sdk_client.messages.stream(model=model, max_tokens=64, messages=USER_MESSAGES) as stream:
            final = stream.get_final_message()

    create_request, stream_request = fake_api.requests
    assert message.usage.model_dump(exclude_none=True) == SCRIPTED_USAGE
    assert final.usage.output_tokens == 42
    assert final.stop_reason == "end_turn"
    assert create_request.path == f"/model/{model}/invoke"
    assert stream_request.path == f"/model/{model}/invoke-with-response-stream"
    assert stream_request.model == model
    assert "model" not in stream_request.body
    assert stream_request.headers["authorization"].startswith("AWS4-HMAC-SHA256")


def test_bedrock_arn_model_and_stream_error(fake_api, no_aws_metadata):
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-sse-error"

    with bedrock_client(fake_api) as sdk_client:
        stream = sdk_client.messages.create(model=arn, max_tokens=64, messages=USER_MESSAGES, stream=True)
        with pytest.raises(anthropic.APIStatusError):
            list(stream)

    assert fake_api.requests[0].model == arn
    assert "%2F" in fake_api.requests[0].path


def test_vertex_create_and_stream(fake_api):
    model = "claude-3-5-haiku@20241022"
    sdk_client = AnthropicVertex(
        base_url=fake_api.base_url, region="us-east5", project_id="demo-project", access_token="x", max_retries=2
    )

    with sdk_client:
        message = sdk_client.messages.create(model=model, max_tokens=64, messages=USER_MESSAGES)
        with sdk_client.messages.stream(model=model, max_tokens=64, messages=USER_MESSAGES) as stream:
            final = stream.get_final_message()
        counted = sdk_client.messages.count_tokens(model=model, messages=USER_MESSAGES)

    create_request, stream_request, count_request = fake_api.requests
    assert message.model == model
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens
    assert counted.input_tokens == message.usage.input_tokens
    assert create_request.path.endswith(":rawPredict")
    assert stream_request.path.endswith(":streamRawPredict")
    assert stream_request.model == model
    assert "anthropic_version" in stream_request.body
    assert count_request.path.endswith("/count-tokens:rawPredict")


# -- lifecycle --------------------------------------------------------------------------


def test_stop_fast_with_open_connections():
    server = FakeAnthropicAPI().start()
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    idle.request("GET", "/v1/messages/batches")
    idle.getresponse().read()
    server.enqueue(Reply(delay_seconds=30))
    slow = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    payload = json.dumps({"model": MODEL, "max_tokens": 16, "messages": USER_MESSAGES})
    slow_thread = threading.Thread(target=slow.request, args=("POST", "/v1/messages", payload), daemon=True)
    slow_thread.start()
    time.sleep(0.1)

    started = time.monotonic()
    server.stop()
    elapsed = time.monotonic() - started
    idle.close()
    slow.close()

    assert elapsed < 1.0
