"""A small Flask app whose LLM features are costed by llmcost-mw.

The same features as `examples/fastapi_app`, on WSGI:

- `POST /summarize/<doc_id>`: summarises a document with a cached system
  prompt; the view names its feature `summarize`.
- `POST /chat`: streams a reply from a plain generator; the feature is the
  URL rule `/chat`.
- `POST /agent/<task>`: a tool-use loop of several calls in one request.
- `POST /translate`: a large document on the most capable model.
- `GET /metrics`: Prometheus metrics; `GET /healthz`: a liveness check.

Users authenticate with `Authorization: Bearer <user id>` (a stand-in for
real authentication). Run it against the real API with ANTHROPIC_API_KEY
set, or offline with `llmcost demo --app examples.flask_app.app:app`, which
points ANTHROPIC_BASE_URL at a local fake API:

    gunicorn -w 1 --threads 4 examples.flask_app.app:app

Under gunicorn, stop it with SIGTERM: the worker exits normally and the
recorder writes its queue at exit.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
from flask import Flask, Response, abort, g, jsonify, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

import llmcost_mw
from llmcost_mw.flask_ext import LLMCostFlask

DATABASE_URL = os.environ.get("LLMCOST_DATABASE_URL", "sqlite:///costs.db")
MODEL = os.environ.get("EXAMPLE_MODEL", "claude-sonnet-4-6")
LARGE_MODEL = os.environ.get("EXAMPLE_LARGE_MODEL", "claude-opus-4-8")

llmcost_mw.instrument(database_url=DATABASE_URL)

app = Flask(__name__)
LLMCostFlask(app, user_id=lambda request: g.get("user_id"))
# Mounted outside the middleware: scraping the metrics is not an LLM request.
app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/metrics": llmcost_mw.make_metrics_wsgi_app()})  # type: ignore[method-assign]

# The SDK reads ANTHROPIC_API_KEY and ANTHROPIC_BASE_URL from the environment.
client = anthropic.Anthropic()

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

MAX_AGENT_CALLS = 8


def require_user(view: Callable[..., Any]) -> Callable[..., Any]:
    """Reject a request without a Bearer user; store the user in `g`, where LLMCostFlask reads it."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:].strip():
            abort(401, description="send Authorization: Bearer <user id>")
        g.user_id = header[7:].strip()
        return view(*args, **kwargs)

    return wrapper


def json_field(name: str) -> str:
    """Return a string field of the JSON body, or reject the request with 400."""
    body = request.get_json(silent=True)
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str):
        abort(400, description=f"the JSON body needs a string field {name!r}")
    return value


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/summarize/<doc_id>")
@require_user
def summarize(doc_id: str) -> Response:
    text = json_field("text")
    llmcost_mw.set_attribution(feature="summarize")
    message = client.messages.create(
        model=MODEL,
        max_tokens=600,
        system=SUMMARY_SYSTEM,
        messages=[{"role": "user", "content": f"Summarise document {doc_id}:\n\n{text}"}],
    )
    return jsonify(doc_id=doc_id, summary=_text(message), usage=message.usage.model_dump())


@app.post("/chat")
@require_user
def chat() -> Response:
    prompt = json_field("message")

    # A plain generator: it runs after the view has returned, while the
    # server sends the body, and the middleware keeps the request's
    # attribution for it.
    def reply() -> Iterator[str]:
        with client.messages.stream(
            model=MODEL, max_tokens=300, messages=[{"role": "user", "content": prompt}]
        ) as stream:
            yield from stream.text_stream

    return Response(reply(), mimetype="text/plain")


@app.post("/agent/<task>")
@require_user
def agent(task: str) -> Response:
    messages: list[dict[str, object]] = [{"role": "user", "content": json_field("prompt")}]
    calls = 0
    while calls < MAX_AGENT_CALLS:
        calls += 1
        message = client.messages.create(model=MODEL, max_tokens=400, tools=[WEATHER_TOOL], messages=messages)
        if message.stop_reason != "tool_use":
            return jsonify(task=task, calls=calls, answer=_text(message))
        messages.append({"role": "assistant", "content": [block.model_dump() for block in message.content]})
        results = [
            {"type": "tool_result", "tool_use_id": block.id, "content": json.dumps(_weather(block.input))}
            for block in message.content
            if block.type == "tool_use"
        ]
        messages.append({"role": "user", "content": results})
    abort(508, description=f"the agent made {calls} calls without finishing")


@app.post("/translate")
@require_user
def translate() -> Response:
    text = json_field("text")
    message = client.messages.create(
        model=LARGE_MODEL,
        max_tokens=4000,
        messages=[{"role": "user", "content": f"Translate into French:\n\n{text}"}],
    )
    return jsonify(translation=_text(message), usage=message.usage.model_dump())


def _weather(arguments: object) -> dict[str, object]:
    city = arguments.get("city", "unknown") if isinstance(arguments, dict) else "unknown"
    return {"city": city, "forecast": "sunny", "high_c": 21}


def _text(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")
