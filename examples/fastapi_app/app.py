"""A small FastAPI app whose LLM features are costed by llmcost-mw.

Features:

- `POST /summarize/{doc_id}`: summarises a document with a cached system
  prompt; the endpoint names its feature `summarize`.
- `POST /chat`: streams a reply; the feature is the route template `/chat`.
- `POST /agent/{task}`: a tool-use loop of several calls in one request.
- `POST /translate`: a large document on the most capable model.
- `GET /metrics`: Prometheus metrics.

Users authenticate with `Authorization: Bearer <user id>` (a stand-in for
real authentication). Run it against the real API with ANTHROPIC_API_KEY
set, or offline with `llmcost demo`, which points ANTHROPIC_BASE_URL at a
local fake API:

    uvicorn examples.fastapi_app.app:app
"""

from __future__ import annotations

import json
import os

import anthropic
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import llmcost_mw

DATABASE_URL = os.environ.get("LLMCOST_DATABASE_URL", "sqlite:///costs.db")
MODEL = os.environ.get("EXAMPLE_MODEL", "claude-sonnet-4-6")
LARGE_MODEL = os.environ.get("EXAMPLE_LARGE_MODEL", "claude-opus-4-8")

llmcost_mw.instrument(database_url=DATABASE_URL)

app = FastAPI(title="llmcost-mw example")
app.add_middleware(
    llmcost_mw.LLMCostMiddleware,
    user_id=lambda request: getattr(request.state, "user_id", None),
)
app.mount("/metrics", llmcost_mw.make_metrics_asgi_app())

# The SDK reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL from the environment.
client = anthropic.AsyncAnthropic()

SUMMARY_SYSTEM = [
    {
        "type": "text",
        "text": "You write short, faithful summaries of internal documents. " * 40,
        "cache_control": {"type": "ephemeral"},
    }
]

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}


def current_user(request: Request) -> str:
    """Resolve the caller; the middleware reads the id from `request.state` when a call is made."""
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer ") or not header[7:].strip():
        raise HTTPException(status_code=401, detail="send Authorization: Bearer <user id>")
    request.state.user_id = header[7:].strip()
    return request.state.user_id


class Document(BaseModel):
    text: str


class ChatMessage(BaseModel):
    message: str


class Task(BaseModel):
    prompt: str


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/summarize/{doc_id}")
async def summarize(doc_id: str, document: Document, user: str = Depends(current_user)) -> dict[str, object]:
    llmcost_mw.set_attribution(feature="summarize")
    message = await client.messages.create(
        model=MODEL,
        max_tokens=600,
        system=SUMMARY_SYSTEM,
        messages=[{"role": "user", "content": f"Summarise document {doc_id}:\n\n{document.text}"}],
    )
    return {"doc_id": doc_id, "summary": _text(message), "usage": message.usage.model_dump()}


@app.post("/chat")
async def chat(body: ChatMessage, user: str = Depends(current_user)) -> StreamingResponse:
    async def reply() -> object:
        async with client.messages.stream(
            model=MODEL, max_tokens=300, messages=[{"role": "user", "content": body.message}]
        ) as stream:
            async for text in stream.text_stream:
                yield text

    return StreamingResponse(reply(), media_type="text/plain")


@app.post("/agent/{task}")
async def agent(task: str, body: Task, user: str = Depends(current_user)) -> dict[str, object]:
    messages: list[dict[str, object]] = [{"role": "user", "content": body.prompt}]
    calls = 0
    while calls < 8:
        calls += 1
        message = await client.messages.create(
            model=MODEL, max_tokens=400, tools=[WEATHER_TOOL], messages=messages
        )
        if message.stop_reason != "tool_use":
            return {"task": task, "calls": calls, "answer": _text(message)}
        messages.append({"role": "assistant", "content": [block.model_dump() for block in message.content]})
        results = [
            {"type": "tool_result", "tool_use_id": block.id, "content": json.dumps(_weather(block.input))}
            for block in message.content
            if block.type == "tool_use"
        ]
        messages.append({"role": "user", "content": results})
    raise HTTPException(status_code=508, detail=f"the agent made {calls} calls without finishing")


@app.post("/translate")
async def translate(document: Document, user: str = Depends(current_user)) -> dict[str, object]:
    message = await client.messages.create(
        model=LARGE_MODEL,
        max_tokens=4000,
        messages=[{"role": "user", "content": f"Translate into French:\n\n{document.text}"}],
    )
    return {"translation": _text(message), "usage": message.usage.model_dump()}


def _weather(arguments: object) -> dict[str, object]:
    city = arguments.get("city", "unknown") if isinstance(arguments, dict) else "unknown"
    return {"city": city, "forecast": "sunny", "high_c": 21}


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")
