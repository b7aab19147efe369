"""A fake OpenAI API on 127.0.0.1 for tests that drive the real `openai` SDK.

The behaviour of a call is chosen by a suffix of the request's `model`:

- `-retry500`: 500 on the first attempt (`x-stainless-retry-count: 0`), then 200.
- `-fail500`: 500 on every attempt.
- `-badusage`: a usage with a negative prompt count.

Other models are served normally, and the suffix is removed from the
`model` of the response. A response to an Azure deployment path names
`AZURE_MODEL`, as Azure names the model behind the deployment.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

AZURE_MODEL = "gpt-4.1-mini-2025-04-14"
# -malformed: a chat stream with one chunk whose `choices` is a number.
# -cut: a chat stream whose connection closes after two chunks.
# -length: a chat completion that stopped at its token limit.
# -typed: a chat stream whose chunks carry an extra `type` field.
BEHAVIOURS = ("-retry500", "-fail500", "-badusage", "-malformed", "-cut", "-length", "-typed")

# Chat and legacy completions usage: 1000 prompt tokens, of which 400 were
# read from the cache, and 300 completion tokens, of which 120 were reasoning.
CHAT_USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 300,
    "total_tokens": 1300,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 0},
}
# The same counts as a Responses API usage.
RESPONSES_USAGE = {
    "input_tokens": 1000,
    "input_tokens_details": {"cached_tokens": 400},
    "output_tokens": 300,
    "output_tokens_details": {"reasoning_tokens": 120},
    "total_tokens": 1300,
}
EMBEDDING_USAGE = {"prompt_tokens": 8, "total_tokens": 8}
BAD_USAGE = {"prompt_tokens": -5, "completion_tokens": 3, "total_tokens": -2}

_DEPLOYMENT_PATH = re.compile(r"^/openai/deployments/[^/]+(/.*)$")


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


def split_model(model: str) -> tuple[str, str | None]:
    """Return the model without its behaviour suffix, and the suffix."""
    for suffix in BEHAVIOURS:
        if model.endswith(suffix):
            return model[: -len(suffix)], suffix
    return model, None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        # The test output stays readable without one line per request.
        pass

    def do_GET(self) -> None:
        self.server.fake.seen.append(SeenRequest("GET", self.path, dict(self.headers)))
        response_id = self.path.rstrip("/").split("/")[-1].split("?")[0]
        self._send_json(200, _response_body(response_id, "gpt-5", RESPONSES_USAGE))

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.fake.seen.append(SeenRequest("POST", self.path, dict(self.headers), body))

        path = self.path.split("?")[0]
        azure = _DEPLOYMENT_PATH.match(path)
        if azure:
            path = "/v1" + azure.group(1)
        model, behaviour = split_model(str(body.get("model", "")))
        if azure:
            model = AZURE_MODEL
        retry_count = self.headers.get("x-stainless-retry-count", "0")
        if behaviour == "-fail500" or (behaviour == "-retry500" and retry_count == "0"):
            # `retry-after-ms` keeps the SDK's retry wait short.
            self._send_json(
                500,
                {"error": {"message": "fake server error", "type": "server_error"}},
                headers={"retry-after-ms": "1"},
            )
            return
        usage = BAD_USAGE if behaviour == "-badusage" else None
        self.behaviour = behaviour

        if path == "/v1/chat/completions":
            self._chat(body, model, usage or CHAT_USAGE)
        elif path == "/v1/completions":
            self._completion(body, model, usage or CHAT_USAGE)
        elif path == "/v1/responses":
            self._responses(body, model, usage or RESPONSES_USAGE)
        elif path == "/v1/responses/input_tokens":
            self._send_json(200, {"object": "response.input_tokens", "input_tokens": 12})
        elif path == "/v1/embeddings":
            self._embeddings(body, model)
        else:
            self._send_json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})

    def _chat(self, body: dict[str, Any], model: str, usage: dict[str, Any]) -> None:
        content = self.server.fake.chat_content
        if not body.get("stream"):
            self._send_json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "length" if self.behaviour == "-length" else "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                    "service_tier": "default",
                },
            )
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {
                "id": "chatcmpl-s1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                "usage": None,
            }

        frames = [
            chunk({"role": "assistant", "content": ""}, None),
            chunk({"content": content[:5]}, None),
            chunk({"content": content[5:]}, None),
            chunk({}, "stop"),
        ]
        if self.behaviour == "-malformed":
            frames.insert(2, {**chunk({}, None), "choices": 7})
        if include_usage:
            frames.append({**chunk({}, None), "choices": [], "usage": usage})
        if self.behaviour == "-typed":
            frames = [{**frame, "type": "chat.completion.chunk"} for frame in frames]
        lines = [f"data: {json.dumps(frame)}\n\n" for frame in frames] + ["data: [DONE]\n\n"]
        if self.behaviour == "-cut":
            self._send_cut_sse(lines[:2])
            return
        self._send_sse(lines)

    def _completion(self, body: dict[str, Any], model: str, usage: dict[str, Any]) -> None:
        self._send_json(
            200,
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "text": " done", "finish_reason": "stop", "logprobs": None}],
                "usage": usage,
            },
        )

    def _responses(self, body: dict[str, Any], model: str, usage: dict[str, Any]) -> None:
        if body.get("background"):
            queued = _response_body("resp_bg", model, None)
            queued["status"] = "queued"
            queued["output"] = []
            self._send_json(200, queued)
            return
        if not body.get("stream"):
            self._send_json(200, _response_body("resp_1", model, usage))
            return
        terminal = self.server.fake.responses_terminal
        created = {**_response_body("resp_s1", model, None), "status": "in_progress", "output": []}
        final = _response_body("resp_s1", model, usage)
        if terminal == "response.incomplete":
            final["status"] = "incomplete"
            final["incomplete_details"] = {"reason": "max_output_tokens"}
        events = [
            {"type": "response.created", "sequence_number": 0, "response": created},
            {"type": "response.in_progress", "sequence_number": 1, "response": created},
            {"type": terminal, "sequence_number": 2, "response": final},
        ]
        self._send_sse([f"event: {event['type']}\ndata: {json.dumps(event)}\n\n" for event in events])

    def _embeddings(self, body: dict[str, Any], model: str) -> None:
        vector = [0.25, -0.5]
        if body.get("encoding_format") == "base64":
            embedding: Any = base64.b64encode(struct.pack("<2f", *vector)).decode()
        else:
            embedding = vector
        self._send_json(
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                "model": model,
                "usage": EMBEDDING_USAGE,
            },
        )

    def _send_json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-request-id", "req_fake")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_cut_sse(self, frames: list[str]) -> None:
        """Announce a longer body than is sent, then close the connection."""
        data = "".join(frames).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data) + 1000))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True

    def _send_sse(self, frames: list[str]) -> None:
        data = "".join(frames).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _response_body(response_id: str, model: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "A summary.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI


class FakeOpenAI:
    """Runs the fake API in a thread; `seen` lists every request it received."""

    def __init__(self) -> None:
        self.seen: list[SeenRequest] = []
        # The assistant text of chat replies; a JSON object suits `.parse()`.
        self.chat_content = '{"answer": "Paris"}'
        # The last event type of a streamed Responses API reply.
        self.responses_terminal = "response.completed"
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-openai", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def posts(self) -> list[SeenRequest]:
        return [request for request in self.seen if request.method == "POST"]

    def start(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
