"""Measure the time that the llmcost middleware adds to a trivial request.

Each app is called directly, with no server and no network. The ASGI app
gets a minimal scope, receive and send in one event loop. The WSGI app gets
a minimal environ and start_response, and its body is iterated and closed as
a server would. No LLM call is made, so the lazy user and feature resolvers
never run: the figures are the fixed cost per request of opening and closing
the attribution.

Batches of requests with and without the middleware alternate, so that
drift in CPU speed affects both alike. The table reports the median over
batches of the mean time per request, the difference in microseconds and the
ratio. The last column is the difference between the fastest batches, which
varies less on a machine that other processes keep busy. The garbage
collector is off while a case runs, as in `timeit`.

    python benchmarks/middleware_overhead.py [--batches 1000] [--batch-size 100]

It prints the table and writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import flask
from _common import load_average, machine_summary

from llmcost_mw import LLMCostMiddleware, LLMCostWSGIMiddleware
from llmcost_mw.flask_ext import LLMCostFlask

# A Flask request costs tens of microseconds, so its batches are smaller.
FLASK_BATCH_DIVISOR = 10


def bearer_user(value: str | None) -> str | None:
    return value[7:] if value and value.startswith("Bearer ") else None


# --- ASGI ---------------------------------------------------------------------------

ASGI_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/",
    "raw_path": b"/",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"bench"), (b"authorization", b"Bearer alice")],
    "server": ("127.0.0.1", 8000),
    "client": ("127.0.0.1", 50000),
}


async def trivial_asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    return None


def time_asgi_batch(app: Any, size: int) -> float:
    """Return the mean seconds per request over `size` requests."""

    async def batch() -> float:
        start = time.perf_counter()
        for _ in range(size):
            await app(dict(ASGI_SCOPE), receive, send)
        return (time.perf_counter() - start) / size

    return asyncio.run(batch())


# --- WSGI ---------------------------------------------------------------------------

WSGI_ENVIRON: dict[str, Any] = {
    "REQUEST_METHOD": "GET",
    "SCRIPT_NAME": "",
    "PATH_INFO": "/",
    "QUERY_STRING": "",
    "SERVER_NAME": "bench",
    "SERVER_PORT": "8000",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_HOST": "bench",
    "HTTP_AUTHORIZATION": "Bearer alice",
    "wsgi.version": (1, 0),
    "wsgi.url_scheme": "http",
    "wsgi.errors": sys.stderr,
    "wsgi.multithread": True,
    "wsgi.multiprocess": False,
    "wsgi.run_once": False,
}


def start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None
) -> Callable[[bytes], None]:
    return lambda data: None


def list_body_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def generator_body_app(environ: dict[str, Any], start_response: Any) -> Any:
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b"ok"


def time_wsgi_batch(app: Any, size: int) -> float:
    """Return the mean seconds per request over `size` requests, body iterated and closed."""
    start = time.perf_counter()
    for _ in range(size):
        body = app(dict(WSGI_ENVIRON), start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return (time.perf_counter() - start) / size


def flask_app(with_extension: bool) -> Any:
    app = flask.Flask("bench")
    app.get("/")(lambda: "ok")
    if with_extension:
        LLMCostFlask(app, user_id=lambda request: bearer_user(request.headers.get("Authorization")))
    return app.wsgi_app


# --- measurement --------------------------------------------------------------------


def measure(
    time_batch: Callable[[Any, int], float], bare: Any, wrapped: Any, batches: int, size: int
) -> tuple[list[float], list[float]]:
    """Return the seconds per request of each batch, without and with the middleware."""
    time_batch(bare, size)  # warm-up: imports, caches, first allocations
    time_batch(wrapped, size)
    bare_times: list[float] = []
    wrapped_times: list[float] = []
    # One collection per case: a full collection takes tens of milliseconds
    # with these libraries loaded, and requests free their objects by
    # reference counting.
    gc.collect()
    gc.disable()
    try:
        for _ in range(batches):
            bare_times.append(time_batch(bare, size))
            wrapped_times.append(time_batch(wrapped, size))
    finally:
        gc.enable()
    return bare_times, wrapped_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=1000, help="batches per app and variant (default: 1000)"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="requests per batch (default: 100)")
    args = parser.parse_args()
    if args.batches < 1 or args.batch_size < FLASK_BATCH_DIVISOR:
        parser.error(f"--batches must be at least 1 and --batch-size at least {FLASK_BATCH_DIVISOR}")

    def user_from_scope(connection: Any) -> str | None:
        return bearer_user(connection.headers.get("authorization"))

    def user_from_environ(environ: dict[str, Any]) -> str | None:
        return bearer_user(environ.get("HTTP_AUTHORIZATION"))

    cases = [
        (
            "ASGI, trivial app",
            time_asgi_batch,
            trivial_asgi_app,
            LLMCostMiddleware(trivial_asgi_app, user_id=user_from_scope),
            args.batch_size,
        ),
        (
            "WSGI, list body",
            time_wsgi_batch,
            list_body_app,
            LLMCostWSGIMiddleware(list_body_app, user_id=user_from_environ),
            args.batch_size,
        ),
        (
            "WSGI, generator body",
            time_wsgi_batch,
            generator_body_app,
            LLMCostWSGIMiddleware(generator_body_app, user_id=user_from_environ),
            args.batch_size,
        ),
        (
            "Flask, one view",
            time_wsgi_batch,
            flask_app(with_extension=False),
            flask_app(with_extension=True),
            args.batch_size // FLASK_BATCH_DIVISOR,
        ),
    ]

    print(machine_summary())
    print(f"load average at start: {load_average()}")
    print(f"{args.batches} batches per variant; median of the per-batch mean time per request")
    print()
    header = (
        f"{'app':<22} {'requests':>9} {'without µs':>11} {'with µs':>9} {'added µs':>9} {'ratio':>6}"
        f" {'added µs, fastest':>18}"
    )
    print(header)
    print("-" * len(header))
    for name, time_batch, bare, wrapped, size in cases:
        bare_times, wrapped_times = measure(time_batch, bare, wrapped, args.batches, size)
        without = statistics.median(bare_times)
        with_middleware = statistics.median(wrapped_times)
        fastest_added = min(wrapped_times) - min(bare_times)
        print(
            f"{name:<22} {args.batches * size:>9} {without * 1e6:>11.2f} {with_middleware * 1e6:>9.2f} "
            f"{(with_middleware - without) * 1e6:>9.2f} {with_middleware / without:>6.2f}"
            f" {fastest_added * 1e6:>18.2f}"
        )
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
