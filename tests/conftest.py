"""Shared fixtures: a temporary store, a fresh Prometheus registry, an instrumented tracker, SDK clients."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anthropic
import httpx2
import pytest
from prometheus_client import CollectorRegistry

from llmcost_mw import instrument, uninstrument
from llmcost_mw.metrics import Metrics
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store

Reply = Callable[[httpx2.Request], httpx2.Response]


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "costs.db"


@pytest.fixture
def store(db_path):
    store = Store(f"sqlite:///{db_path}")
    yield store
    store.dispose()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def tracker(store, registry, tmp_path):
    """Instrument the SDK with a store in tmp_path and a fresh registry, and undo it after the test."""
    recorder = Recorder(store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05)
    # Metrics are built here rather than from `registry=`, because instrument()
    # caches Metrics by id(registry) and a freed registry's id can be reused.
    tracker = instrument(store=store, recorder=recorder, metrics=Metrics(registry))
    yield tracker
    uninstrument()
    recorder.close(timeout_seconds=2.0)


class ScriptedAPI:
    """Builds SDK clients whose HTTP requests are served in-process by scripted replies.

    Each request takes the next reply in order; the last reply serves every
    request after it. Every request sent is kept in `requests`.
    """

    def __init__(self) -> None:
        self.requests: list[httpx2.Request] = []
        self._replies: list[Reply] = []
        self._sync_clients: list[anthropic.Anthropic] = []
        self._async_clients: list[anthropic.AsyncAnthropic] = []

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        if not self._replies:
            raise AssertionError(f"no scripted reply left for {request.method} {request.url}")
        reply = self._replies.pop(0) if len(self._replies) > 1 else self._replies[0]
        return reply(request)

    def client(self, *replies: Reply, max_retries: int = 0) -> anthropic.Anthropic:
        self._replies = list(replies)
        http_client = httpx2.Client(transport=httpx2.MockTransport(self._handle))
        client = anthropic.Anthropic(
            api_key="k", base_url="http://api.test", http_client=http_client, max_retries=max_retries
        )
        self._sync_clients.append(client)
        return client

    def async_client(self, *replies: Reply, max_retries: int = 0) -> anthropic.AsyncAnthropic:
        self._replies = list(replies)
        http_client = httpx2.AsyncClient(transport=httpx2.MockTransport(self._handle))
        client = anthropic.AsyncAnthropic(
            api_key="k", base_url="http://api.test", http_client=http_client, max_retries=max_retries
        )
        self._async_clients.append(client)
        return client

    def close(self) -> None:
        for client in self._sync_clients:
            client.close()
        for client in self._async_clients:
            asyncio.run(client.close())


@pytest.fixture
def api():
    scripted = ScriptedAPI()
    yield scripted
    scripted.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server owned by the test session; skipped where PostgreSQL is missing, except in CI."""
    from postgres_server import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_url(request, tmp_path):
    """A fresh, empty store URL on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'costs.db'}"
    return request.getfixturevalue("postgres_server").create_database()
