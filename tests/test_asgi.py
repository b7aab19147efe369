"""`LLMCostMiddleware` on real Starlette and FastAPI apps."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import asdict

import httpx2
import pytest
from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from llmcost_mw import LLMCostMiddleware, attribute
from llmcost_mw.context import capture, current_attribution


async def snapshot_endpoint(request):
    return JSONResponse(asdict(capture()))


def sync_snapshot_endpoint(request):
    # Starlette runs a sync endpoint in a worker thread.
    return JSONResponse(asdict(capture()))


async def overriding_endpoint(request):
    with attribute(feature="custom-feature"):
        return JSONResponse(asdict(capture()))


def starlette_app(**middleware_options) -> Starlette:
    inner = Starlette(routes=[Route("/items/{item_id}", snapshot_endpoint)])
    routes = [
        Route("/summarize/{doc_id}", snapshot_endpoint),
        Route("/sync/{doc_id}", sync_snapshot_endpoint),
        Route("/override", overriding_endpoint),
        Mount("/api", app=inner),
    ]
    return Starlette(routes=routes, middleware=[Middleware(LLMCostMiddleware, **middleware_options)])


def test_feature_is_route_template():
    with TestClient(starlette_app()) as client:
        body = client.get("/summarize/42").json()

    assert body["feature"] == "/summarize/{doc_id}"
    assert body["context_missing"] is False


def test_sync_endpoint_sees_attribution():
    with TestClient(starlette_app(user_header="x-user-id")) as client:
        body = client.get("/sync/7", headers={"x-user-id": "alice"}).json()

    assert body["feature"] == "/sync/{doc_id}"
    assert body["user_id"] == "alice"


def test_mounted_app_gets_prefix():
    with TestClient(starlette_app()) as client:
        body = client.get("/api/items/9").json()

    assert body["feature"] == "/api/items/{item_id}"


def test_root_path_not_in_feature():
    # A root_path set by a proxy is where the whole app is served, not part of a route.
    with TestClient(starlette_app(), root_path="/prefix") as client:
        body = client.get("/summarize/1").json()

    assert body["feature"] == "/summarize/{doc_id}"


def test_feature_callable_overrides():
    app = starlette_app(feature=lambda conn: conn.headers.get("x-feature"))

    with TestClient(app) as client:
        chosen = client.get("/summarize/1", headers={"x-feature": "from-header"}).json()
        fallback = client.get("/summarize/1").json()

    assert chosen["feature"] == "from-header"
    assert fallback["feature"] == "/summarize/{doc_id}"


def test_failing_feature_callable_falls_back(caplog):
    def broken(conn):
        raise RuntimeError("boom")

    with TestClient(starlette_app(feature=broken)) as client:
        response = client.get("/summarize/1")

    assert response.status_code == 200
    assert response.json()["feature"] == "/summarize/{doc_id}"
    assert "feature resolver" in caplog.text


def test_attribute_in_endpoint_overrides():
    with TestClient(starlette_app(user_header="x-user-id")) as client:
        body = client.get("/override", headers={"x-user-id": "bob"}).json()

    assert body["feature"] == "custom-feature"
    assert body["user_id"] == "bob"


def test_user_header_option():
    with TestClient(starlette_app(user_header="X-User-Id")) as client:
        body = client.get("/summarize/1", headers={"x-user-id": "carol"}).json()

    assert body["user_id"] == "carol"


def test_request_id_header():
    with TestClient(starlette_app()) as client:
        body = client.get("/summarize/1", headers={"x-request-id": "req-123"}).json()
        generated = client.get("/summarize/1").json()

    assert body["request_id"] == "req-123"
    assert generated["request_id"]
    assert generated["request_id"] != "req-123"


def test_user_id_and_user_header_rejected():
    with pytest.raises(ValueError, match="user_header"):
        LLMCostMiddleware(starlette_app(), user_id=lambda conn: None, user_header="x-user-id")


def fastapi_app() -> FastAPI:
    app = FastAPI()

    def authenticate(request: Request) -> str:
        user = request.headers.get("authorization", "").removeprefix("Bearer ")
        request.state.user = user or None
        return user

    @app.get("/summarize/{doc_id}")
    async def summarize(doc_id: int, user: str = Depends(authenticate)):
        return asdict(capture())

    app.add_middleware(LLMCostMiddleware, user_id=lambda conn: getattr(conn.state, "user", None))
    return app


def test_fastapi_user_from_dependency():
    with TestClient(fastapi_app()) as client:
        body = client.get("/summarize/5", headers={"authorization": "Bearer dave"}).json()

    assert body["user_id"] == "dave"
    assert body["feature"] == "/summarize/{doc_id}"


def test_fastapi_anonymous_request():
    with TestClient(fastapi_app()) as client:
        body = client.get("/summarize/5").json()

    assert body["user_id"] is None
    assert body["context_missing"] is False


def test_lifespan_passes_through():
    events = []

    @contextlib.asynccontextmanager
    async def lifespan(app):
        events.append(("startup", current_attribution()))
        yield
        events.append(("shutdown", current_attribution()))

    app = Starlette(
        routes=[Route("/summarize/{doc_id}", snapshot_endpoint)],
        middleware=[Middleware(LLMCostMiddleware)],
        lifespan=lifespan,
    )
    with TestClient(app) as client:
        client.get("/summarize/1")

    assert events == [("startup", None), ("shutdown", None)]


def test_non_http_scope_untouched():
    seen = []

    async def inner(scope, receive, send):
        seen.append((scope["type"], current_attribution()))

    middleware = LLMCostMiddleware(inner)
    asyncio.run(middleware({"type": "lifespan"}, None, None))

    assert seen == [("lifespan", None)]


def test_context_reset_after_request():
    app = starlette_app(user_header="x-user-id")

    async def two_requests():
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://app.test") as client:
            first = (await client.get("/summarize/1", headers={"x-user-id": "erin"})).json()
            between = current_attribution()
            second = (await client.get("/summarize/2")).json()
        return first, between, second

    first, between, second = asyncio.run(two_requests())

    assert first["user_id"] == "erin"
    assert between is None
    assert second["user_id"] is None
    assert second["request_id"] != first["request_id"]


def test_context_reset_on_same_thread():
    app = starlette_app(user_header="x-user-id")

    with TestClient(app) as client:
        first = client.get("/sync/1", headers={"x-user-id": "frank"}).json()
        second = client.get("/sync/2").json()

    assert first["user_id"] == "frank"
    assert second["user_id"] is None


def test_context_reset_after_endpoint_error():
    async def failing(request):
        raise RuntimeError("endpoint failed")

    app = Starlette(
        routes=[Route("/fail", failing)],
        middleware=[Middleware(LLMCostMiddleware, user_header="x-user-id")],
    )

    async def request_then_check():
        transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx2.AsyncClient(transport=transport, base_url="http://app.test") as client:
            response = await client.get("/fail", headers={"x-user-id": "gina"})
        return response.status_code, current_attribution()

    status, after = asyncio.run(request_then_check())

    assert status == 500
    assert after is None


def test_background_task_and_stream_attributed():
    seen = {}

    def background():
        seen["background"] = capture()

    async def chunks():
        seen["stream"] = capture()
        yield b"chunk"

    async def streaming(request):
        return StreamingResponse(chunks(), background=BackgroundTask(background))

    app = Starlette(
        routes=[Route("/stream/{doc_id}", streaming)],
        middleware=[Middleware(LLMCostMiddleware, user_header="x-user-id")],
    )
    with TestClient(app) as client:
        client.get("/stream/1", headers={"x-user-id": "hank"})

    assert seen["stream"].user_id == "hank"
    assert seen["stream"].feature == "/stream/{doc_id}"
    assert seen["background"].user_id == "hank"
