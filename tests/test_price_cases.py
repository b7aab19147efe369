"""Priced cases end to end: the real SDK calls the local fake API and the stored row carries the cost.

Prices are USD per million tokens from the bundled table. Each expected cost
is worked out in a comment next to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from decimal import Decimal
from typing import Any

import anthropic
import pytest
import uvicorn
from anthropic import AnthropicBedrock, AnthropicVertex, AsyncAnthropic
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmcost_mw import LLMCostMiddleware, attribute, instrument, uninstrument
from llmcost_mw.demo.fake_api import FakeAnthropicAPI, Reply
from llmcost_mw.errors import PriceTableError
from llmcost_mw.metrics import Metrics
from llmcost_mw.pricing import PriceBook
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage, usage_from_anthropic

HAIKU_3_5 = "claude-3-5-haiku-20241022"
SONNET_4 = "claude-sonnet-4-20250514"
SONNET_4_5 = "claude-sonnet-4-5-20250929"
MESSAGES = [{"role": "user", "content": "Hello."}]


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
def registry():
    return CollectorRegistry()


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'costs.db'}")
    yield store
    store.dispose()


@pytest.fixture
def recorder(store, registry, tmp_path):
    recorder = Recorder(store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05)
    instrument(store=store, recorder=recorder, metrics=Metrics(registry))
    yield recorder
    uninstrument()
    recorder.close(timeout_seconds=2.0)


@pytest.fixture
def client(fake_api):
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=0, timeout=10) as sdk:
        yield sdk


def stored_rows(recorder) -> list[dict[str, Any]]:
    assert recorder.flush(timeout_seconds=10)
    return recorder.store.fetch_events()


def only_row(recorder) -> dict[str, Any]:
    rows = stored_rows(recorder)
    assert len(rows) == 1
    return rows[0]


def create(client, model, **kwargs):
    return client.messages.create(model=model, max_tokens=256, messages=MESSAGES, **kwargs)


def counted_cost(registry, **labels) -> float:
    total = 0.0
    for metric in registry.collect():
        if metric.name != "llmcost_cost_usd":
            continue
        for sample in metric.samples:
            if sample.name == "llmcost_cost_usd_total" and all(
                sample.labels.get(key) == value for key, value in labels.items()
            ):
                total += sample.value
    return total


# -- the required cases -----------------------------------------------------------------------


def test_haiku_3_5_streamed_cache_read(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={
                "input_tokens": 4,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 2455,
                "output_tokens": 1,
            },
            delta_usage={"output_tokens": 23},
        )
    )

    for _event in create(client, HAIKU_3_5, stream=True):
        pass
    row = only_row(recorder)

    # 4*0.80 + 2455*0.08 + 23*4.00 = 3.2 + 196.4 + 92 = 291.6 micro-dollars.
    assert row["status"] == "ok"
    assert row["input_tokens"] == 4
    assert row["cache_read_tokens"] == 2455
    assert row["cache_write_5m_tokens"] == 0
    assert row["cache_write_1h_tokens"] == 0
    assert row["output_tokens"] == 23
    assert row["cost_usd"] == float(Decimal("0.0002916"))


def test_sonnet_4_one_hour_cache_write(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={
                "input_tokens": 10,
                "cache_creation_input_tokens": 10000,
                "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 10000},
                "cache_read_input_tokens": 0,
                "output_tokens": 100,
            }
        )
    )

    create(client, SONNET_4)
    row = only_row(recorder)

    # 10*3 + 10000*6 + 100*15 = 30 + 60000 + 1500 = 61530 micro-dollars.
    assert row["cache_write_1h_tokens"] == 10000
    assert row["cache_write_5m_tokens"] == 0
    assert row["cost_usd"] == float(Decimal("0.06153"))
    assert row["flags"] is None


def test_sonnet_4_long_context_reprices_request(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={
                "input_tokens": 200000,
                "cache_creation_input_tokens": 5000,
                "cache_read_input_tokens": 0,
                "output_tokens": 1000,
            }
        )
    )

    create(client, SONNET_4)
    row = only_row(recorder)

    # 205,000 prompt tokens cross 200,000 only with the cache write counted:
    # 200000*6 + 5000*7.50 + 1000*22.50 = 1,200,000 + 37,500 + 22,500 micro-dollars.
    assert row["prompt_tokens"] == 205000
    assert row["cost_usd"] == float(Decimal("1.26"))
    assert "long_context" in row["flags"].split(",")
    # Without the breakdown the write is priced as a 5-minute write, and flagged.
    assert "cache_ttl_unknown" in row["flags"].split(",")


def test_bedrock_profile_id_priced_as_first_party(fake_api, recorder, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bedrock_model = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    usage = {"input_tokens": 1000, "output_tokens": 200}
    fake_api.enqueue(Reply(usage=usage))
    fake_api.enqueue(Reply(usage=usage))

    bedrock = AnthropicBedrock(
        base_url=fake_api.base_url,
        aws_region="us-east-1",
        aws_access_key="x",
        aws_secret_key="y",
        max_retries=0,
    )
    with bedrock:
        create(bedrock, bedrock_model)
    with anthropic.Anthropic(api_key="test", base_url=fake_api.base_url, max_retries=0) as first_party:
        create(first_party, HAIKU_3_5)
    bedrock_row, first_party_row = stored_rows(recorder)

    # 1000*0.80 + 200*4 = 1600 micro-dollars on both platforms.
    assert bedrock_row["cost_usd"] == float(Decimal("0.0016"))
    assert first_party_row["cost_usd"] == bedrock_row["cost_usd"]
    assert bedrock_row["model"] == bedrock_model
    assert bedrock_row["provider"] == "aws.bedrock"
    assert bedrock_row["price_id"] == HAIKU_3_5
    assert first_party_row["model"] == HAIKU_3_5


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Look up the weather for a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
# One usage per turn of the tool loop; the conversation grows each turn.
TOOL_TURNS = [
    ({"input_tokens": 400, "output_tokens": 60}, "tool_use"),
    ({"input_tokens": 520, "output_tokens": 55}, "tool_use"),
    ({"input_tokens": 640, "output_tokens": 120}, "end_turn"),
]
# Sonnet 4.5 at $3 input and $15 output:
# (400+520+640)*3 + (60+55+120)*15 = 4680 + 3525 = 8205 micro-dollars.
TOOL_LOOP_COST = Decimal("0.008205")


def tool_turn_reply(turn: int) -> Reply:
    usage, stop_reason = TOOL_TURNS[turn]
    if stop_reason == "tool_use":
        content = [
            {"type": "tool_use", "id": f"toolu_{turn}", "name": "get_weather", "input": {"city": "Paris"}}
        ]
    else:
        content = [{"type": "text", "text": "It is sunny in Paris."}]
    return Reply(usage=usage, stop_reason=stop_reason, content=content, id=f"msg_turn_{turn}")


def weather_app(api_base_url: str) -> Starlette:
    async def weather(request):
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Paris?"}]
        stop_reasons = []
        async with AsyncAnthropic(api_key="test", base_url=api_base_url, max_retries=0) as llm:
            while True:
                message = await llm.messages.create(
                    model=SONNET_4_5, max_tokens=256, tools=[WEATHER_TOOL], messages=messages
                )
                stop_reasons.append(message.stop_reason)
                if message.stop_reason != "tool_use":
                    break
                tool_use = next(block for block in message.content if block.type == "tool_use")
                messages.append(
                    {"role": "assistant", "content": [block.model_dump() for block in message.content]}
                )
                messages.append(
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}],
                    }
                )
        return JSONResponse({"stop_reasons": stop_reasons})

    return Starlette(
        routes=[Route("/weather/{city}", weather, methods=["POST"])],
        middleware=[Middleware(LLMCostMiddleware, user_header="x-user-id")],
    )


class ServerThread:
    """Serves an ASGI app with uvicorn on 127.0.0.1 and an ephemeral port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 10 s"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_tool_loop_three_rows_one_request(fake_api, recorder, registry):
    for turn in range(len(TOOL_TURNS)):
        fake_api.enqueue(tool_turn_reply(turn))
    before = counted_cost(registry)

    with ServerThread(weather_app(fake_api.base_url)) as app_url:
        request = urllib.request.Request(
            f"{app_url}/weather/paris",
            method="POST",
            headers={"x-user-id": "u-42", "x-request-id": "req-weather-1"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    rows = stored_rows(recorder)

    assert body["stop_reasons"] == ["tool_use", "tool_use", "end_turn"]
    assert len(rows) == 3
    assert {row["user_id"] for row in rows} == {"u-42"}
    assert {row["feature"] for row in rows} == {"/weather/{city}"}
    assert {row["request_id"] for row in rows} == {"req-weather-1"}
    assert [row["response_id"] for row in rows] == ["msg_turn_0", "msg_turn_1", "msg_turn_2"]
    assert all(row["status"] == "ok" for row in rows)
    row_sum = sum(Decimal(str(row["cost_usd"])) for row in rows)
    assert row_sum == TOOL_LOOP_COST
    counted = counted_cost(registry, feature="/weather/{city}") - before
    assert counted == pytest.approx(float(TOOL_LOOP_COST), abs=1e-12)


# -- fast mode, US-only inference, server tools, compaction -----------------------------------


def test_fast_mode_priced_at_fast_rates(fake_api, client, recorder):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100, "speed": "fast"}))

    create(client, "claude-opus-5")
    row = only_row(recorder)

    # Opus 5 fast mode: 1000*10 + 100*50 = 15000 micro-dollars (standard: 7500).
    assert row["cost_usd"] == float(Decimal("0.015"))
    assert row["unpriced"] is False
    assert row["flags"] == "fast_mode"


def test_fast_mode_without_prices_unpriced(fake_api, client, recorder, caplog):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100, "speed": "fast"}))

    with caplog.at_level(logging.WARNING, logger="llmcost_mw.pricing"):
        create(client, "claude-opus-4-8")
    row = only_row(recorder)

    assert row["cost_usd"] is None
    assert row["unpriced"] is True
    assert row["flags"] == "fast_mode"
    assert row["input_tokens"] == 1000
    warnings = [record.getMessage() for record in caplog.records if record.name == "llmcost_mw.pricing"]
    assert len(warnings) == 1
    assert "fast mode" in warnings[0]
    assert "claude-opus-4-8" in warnings[0]


def test_fast_mode_standard_speed_priced_normally(fake_api, client, recorder):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100, "speed": "standard"}))

    create(client, "claude-opus-4-8")
    row = only_row(recorder)

    # 1000*5 + 100*25 = 7500 micro-dollars.
    assert row["cost_usd"] == float(Decimal("0.0075"))
    assert row["flags"] is None


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # Listed in [inference_geo]: (1000*5 + 100*25) * 1.1 = 8250 micro-dollars.
        pytest.param("claude-opus-4-6", Decimal("0.00825"), id="listed-model"),
        # Not listed: 1000*3 + 100*15 = 4500 micro-dollars, no multiplier.
        pytest.param(SONNET_4_5, Decimal("0.0045"), id="unlisted-model"),
    ],
)
def test_inference_geo_us_multiplier(fake_api, client, recorder, model, expected):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100, "inference_geo": "us"}))

    create(client, model)
    row = only_row(recorder)

    assert row["cost_usd"] == float(expected)
    assert row["flags"] == "inference_geo_us"


def test_inference_geo_global_no_multiplier(fake_api, client, recorder):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100, "inference_geo": "global"}))

    create(client, "claude-opus-4-6")

    assert only_row(recorder)["cost_usd"] == float(Decimal("0.0075"))


def test_fast_mode_and_us_inference_stack(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(usage={"input_tokens": 1000, "output_tokens": 100, "speed": "fast", "inference_geo": "us"})
    )

    create(client, "claude-opus-5")

    # Fast rates, then the US multiplier: 15000 * 1.1 = 16500 micro-dollars.
    assert only_row(recorder)["cost_usd"] == float(Decimal("0.0165"))


def test_server_tools_priced_per_request(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={
                "input_tokens": 1000,
                "output_tokens": 100,
                "server_tool_use": {"web_search_requests": 3, "web_fetch_requests": 2},
            }
        )
    )

    create(client, SONNET_4_5)
    row = only_row(recorder)

    # Tokens 1000*3 + 100*15 = 4500 micro-dollars, plus 3 searches at $0.01;
    # web fetch is priced at $0 per request in the bundled table.
    assert row["web_search_requests"] == 3
    assert row["web_fetch_requests"] == 2
    assert row["cost_usd"] == float(Decimal("0.0345"))


def test_streamed_server_tools_from_delta(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={"input_tokens": 1000, "output_tokens": 1},
            delta_usage={"output_tokens": 100, "server_tool_use": {"web_search_requests": 2}},
        )
    )

    for _event in create(client, SONNET_4_5, stream=True):
        pass
    row = only_row(recorder)

    # 4500 micro-dollars of tokens plus 2 searches at $0.01.
    assert row["web_search_requests"] == 2
    assert row["cost_usd"] == float(Decimal("0.0245"))


COMPACTION_ITERATIONS = [
    {
        "type": "compaction",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    },
    {
        "type": "message",
        "input_tokens": 100,
        "output_tokens": 50,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    },
]
# The top-level usage (100 in, 50 out) leaves out the compaction iteration,
# so the row contains 1100 input and 250 output: 1100*3 + 250*15 = 7050 micro-dollars.
COMPACTION_COST = Decimal("0.00705")


def test_beta_compaction_tokens_added(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(usage={"input_tokens": 100, "output_tokens": 50, "iterations": COMPACTION_ITERATIONS})
    )

    client.beta.messages.create(
        model=SONNET_4_5, max_tokens=256, messages=MESSAGES, betas=["compact-2026-01-12"]
    )
    row = only_row(recorder)

    assert row["input_tokens"] == 1100
    assert row["output_tokens"] == 250
    assert row["cost_usd"] == float(COMPACTION_COST)
    assert row["flags"] == "compaction"


def test_beta_streamed_compaction_from_delta(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(
            usage={"input_tokens": 100, "output_tokens": 1},
            delta_usage={"input_tokens": 100, "output_tokens": 50, "iterations": COMPACTION_ITERATIONS},
        )
    )

    with client.beta.messages.stream(
        model=SONNET_4_5, max_tokens=256, messages=MESSAGES, betas=["compact-2026-01-12"]
    ) as stream:
        stream.get_final_message()
    row = only_row(recorder)

    assert row["input_tokens"] == 1100
    assert row["output_tokens"] == 250
    assert row["cost_usd"] == float(COMPACTION_COST)


def test_missing_cache_breakdown_priced_5m_and_flagged(fake_api, client, recorder):
    fake_api.enqueue(
        Reply(usage={"input_tokens": 0, "cache_creation_input_tokens": 1000, "output_tokens": 0})
    )

    create(client, SONNET_4_5)
    row = only_row(recorder)

    # 1000 * 3.75 = 3750 micro-dollars at the 5-minute rate.
    assert row["cache_write_5m_tokens"] == 1000
    assert row["cost_usd"] == float(Decimal("0.00375"))
    assert row["flags"] == "cache_ttl_unknown"


# -- model ids ----------------------------------------------------------------------------------


def test_vertex_dated_id_keeps_caller_id(fake_api, recorder):
    model = "claude-3-5-haiku@20241022"
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 200}))

    with AnthropicVertex(
        base_url=fake_api.base_url,
        region="us-east5",
        project_id="demo-project",
        access_token="x",
        max_retries=0,
    ) as vertex:
        create(vertex, model)
    row = only_row(recorder)

    assert row["model"] == model
    assert row["price_id"] == HAIKU_3_5
    assert row["cost_usd"] == float(Decimal("0.0016"))


@pytest.mark.parametrize(
    "model",
    [
        pytest.param("claude-opus-4-9", id="newer-dateless-version"),
        pytest.param("claude-sonnet-4-7-20270101", id="newer-dated-version"),
        pytest.param("claude-haiku-4", id="family-without-version"),
    ],
)
def test_unknown_version_unpriced_with_warning(fake_api, client, recorder, caplog, model):
    fake_api.enqueue(Reply(usage={"input_tokens": 1000, "output_tokens": 100}))

    with caplog.at_level(logging.WARNING, logger="llmcost_mw.tracker"):
        create(client, model)
    row = only_row(recorder)

    assert row["cost_usd"] is None
    assert row["unpriced"] is True
    assert row["price_id"] is None
    assert any(model in record.getMessage() for record in caplog.records)


@pytest.fixture(scope="module")
def bundled():
    return PriceBook.load()


@pytest.mark.parametrize(
    "model",
    [
        "claude-3-5-haiku-20241022",
        "claude-3-5-haiku-latest",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "us.anthropic.claude-3-5-haiku-20241022-v1:0",
        "eu.anthropic.claude-3-5-haiku-20241022-v1:0",
        "apac.anthropic.claude-3-5-haiku-20241022-v1:0",
        "global.anthropic.claude-3-5-haiku-20241022-v1:0",
        "us.anthropic.claude-3-5-haiku-20241022-v1:0:200k",
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.anthropic.claude-3-5-haiku-20241022-v1:0",
        "claude-3-5-haiku@20241022",
    ],
)
def test_platform_ids_reach_same_row(bundled, model):
    usage = Usage(input_tokens=1000, output_tokens=200)

    quote = bundled.quote(model, usage)

    assert quote is not None
    assert quote.price_id == HAIKU_3_5
    assert quote.cost_usd == Decimal("0.0016")


@pytest.mark.parametrize(
    "model",
    [
        "us.anthropic.claude-opus-4-6-v1:0",
        "global.anthropic.claude-opus-4-6-v1",
        "claude-opus-4-6@20260205",
        "claude-opus-4-6-20260205",
    ],
)
def test_dateless_model_platform_ids(bundled, model):
    assert bundled.lookup(model).id == "claude-opus-4-6"


def test_lookup_prefers_row_id_over_alias():
    rows = [
        {"id": "model-a-20250101", "aliases": ["model-b"]},
        {"id": "model-b-20250101"},
    ]
    common = {
        "input": "1",
        "output": "2",
        "cache_write_5m": "1.25",
        "cache_write_1h": "2",
        "cache_read": "0.1",
        "source": "https://example.invalid/pricing",
        "checked": "2026-01-01",
    }
    book = PriceBook.from_dict({"version": "test", "models": [{**row, **common} for row in rows]})

    # "model-b-20250101" is a row id: it wins over the alias "model-b" that
    # the same id without its date would match.
    assert book.lookup("model-b-20250101").id == "model-b-20250101"
    assert book.lookup("model-b-20990101").id == "model-a-20250101"
    assert book.lookup("model-b").id == "model-a-20250101"


def test_delta_usage_replaces_not_adds(fake_api, client, recorder):
    start = {
        "input_tokens": 50,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 300,
        "output_tokens": 1,
    }
    fake_api.enqueue(
        Reply(
            usage=start,
            delta_usage={"input_tokens": 50, "cache_read_input_tokens": 300, "output_tokens": 80},
        )
    )

    for _event in create(client, SONNET_4_5, stream=True):
        pass
    row = only_row(recorder)

    # 50*3 + 300*0.30 + 80*15 = 150 + 90 + 1200 = 1440 micro-dollars.
    assert (row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]) == (50, 300, 80)
    assert row["cost_usd"] == float(Decimal("0.00144"))


def test_async_stream_priced_like_sync(fake_api, recorder):
    fake_api.enqueue(
        Reply(
            usage={"input_tokens": 4, "cache_read_input_tokens": 2455, "output_tokens": 1},
            delta_usage={"output_tokens": 23},
        )
    )

    async def run() -> None:
        async with AsyncAnthropic(api_key="test", base_url=fake_api.base_url, max_retries=0) as llm:
            async with llm.messages.stream(model=HAIKU_3_5, max_tokens=256, messages=MESSAGES) as stream:
                await stream.get_final_message()

    with attribute(user_id="u-async"):
        asyncio.run(run())
    row = only_row(recorder)

    assert row["cost_usd"] == float(Decimal("0.0002916"))
    assert row["user_id"] == "u-async"


def table_with_fast_and_long_context() -> dict:
    rates = {"cache_write_5m": "1.25", "cache_write_1h": "2", "cache_read": "0.1"}
    row = {
        "id": "claude-test-1",
        "input": "1",
        "output": "5",
        **rates,
        "source": "https://example.invalid/pricing",
        "checked": "2026-01-01",
        "long_context": {"threshold_tokens": 1000, "input": "2", "output": "10", **rates},
        "fast_mode": {
            "input": "4",
            "output": "20",
            **rates,
            "source": "https://example.invalid/fast",
            "checked": "2026-01-01",
        },
    }
    return {
        "version": "test",
        "models": [row],
        "inference_geo": {"us_multiplier": "1.1", "models": ["claude-test-1"]},
    }


def test_fast_mode_below_threshold_fast_rates():
    book = PriceBook.from_dict(table_with_fast_and_long_context())

    quote = book.quote("claude-test-1", Usage(input_tokens=1000, output_tokens=100, speed="fast"))

    # 1000*4 + 100*20 = 6000 micro-dollars; the prompt is not above 1000.
    assert quote.cost_usd == Decimal("0.006")
    assert quote.fast_mode is True
    assert quote.long_context is False


def test_fast_mode_above_threshold_unpriced(caplog):
    book = PriceBook.from_dict(table_with_fast_and_long_context())

    with caplog.at_level(logging.WARNING, logger="llmcost_mw.pricing"):
        quote = book.quote("claude-test-1", Usage(input_tokens=1001, output_tokens=100, speed="fast"))
        book.quote("claude-test-1", Usage(input_tokens=2000, output_tokens=100, speed="fast"))

    assert quote is None
    assert len(caplog.records) == 1
    assert "long-context threshold" in caplog.records[0].getMessage()


def test_inference_geo_quote_reports_multiplier():
    book = PriceBook.from_dict(table_with_fast_and_long_context())

    quote = book.quote("claude-test-1", Usage(input_tokens=1000, output_tokens=100, inference_geo="us"))

    # (1000*1 + 100*5) * 1.1 = 1650 micro-dollars.
    assert quote.cost_usd == Decimal("0.00165")
    assert quote.inference_geo_multiplier == Decimal("1.1")


def test_inference_geo_unknown_model_rejected():
    data = table_with_fast_and_long_context()
    data["inference_geo"]["models"] = ["claude-test-1", "claude-missing-2"]

    with pytest.raises(PriceTableError, match="claude-missing-2"):
        PriceBook.from_dict(data)


def test_compaction_excluded_from_threshold():
    book = PriceBook.from_dict(table_with_fast_and_long_context())
    usage = usage_from_anthropic(
        {
            "input_tokens": 900,
            "output_tokens": 10,
            "iterations": [
                {"type": "compaction", "input_tokens": 500, "output_tokens": 20},
                {"type": "message", "input_tokens": 900, "output_tokens": 10},
            ],
        }
    )

    quote = book.quote("claude-test-1", usage)

    # 1400 prompt tokens in all, but the request itself has 900, below 1000:
    # 1400*1 + 30*5 = 1550 micro-dollars at the base rates.
    assert usage.input_tokens == 1400
    assert quote.long_context is False
    assert quote.cost_usd == Decimal("0.00155")


def test_alias_string_is_rejected():
    entry = {
        "id": "claude-x-1",
        "aliases": "claude-x",
        "input": "1",
        "output": "1",
        "cache_write_5m": "1",
        "cache_write_1h": "1",
        "cache_read": "1",
        "source": "https://example.invalid/prices",
        "checked": "2026-12-04",
    }

    with pytest.raises(PriceTableError, match="must be a list of model ids"):
        PriceBook.from_dict({"version": "test", "models": [entry]})
