"""The example app under real gunicorn with 4 uvicorn workers and deploy/gunicorn.conf.py.

Every scrape must return the totals of all workers, including a worker that
was killed with SIGKILL and replaced, and a restart must start from zero.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import struct
import subprocess
import time
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client import multiprocess

from llmcost_mw.demo.fake_api import FakeAnthropicAPI
from servers import (
    EXAMPLE_CALL_COST_USD,
    EXAMPLE_MODEL,
    EXAMPLE_USAGE,
    REPO_ROOT,
    example_app_env,
    free_port,
    sample_sum,
    scrape,
    stop_process,
    wait_for_http,
    wait_until,
)

WORKERS = 4

pytestmark = pytest.mark.timeout(180)


class Gunicorn:
    """One gunicorn master serving the example app with deploy/gunicorn.conf.py."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn",
                "-c", str(REPO_ROOT / "deploy" / "gunicorn.conf.py"),
                "-w", str(WORKERS),
                "-k", "uvicorn.workers.UvicornWorker",
                "--bind", f"127.0.0.1:{self.port}",
                "--log-level", "warning",
                "examples.fastapi_app.app:app",
            ],
            env=env,
            cwd=cwd,
        )

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            return []

    def wait_ready(self) -> None:
        wait_for_http(f"{self.base}/healthz", self.process, timeout_seconds=60)
        wait_until(
            lambda: len(self.worker_pids()) == WORKERS, timeout_seconds=60, description=f"{WORKERS} workers"
        )

    @contextlib.contextmanager
    def pinned(self, pid: int) -> Iterator[None]:
        """Stop every other worker, so that `pid` accepts each new connection.

        An async worker accepts every connection it is woken for, so without
        this one worker tends to serve them all.
        """
        others = [other for other in self.worker_pids() if other != pid]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            yield
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)

    def post_summaries(self, count: int) -> None:
        for index in range(count):
            # No session: a new connection per request.
            response = requests.post(
                f"{self.base}/summarize/doc-{index}",
                json={"text": "quarterly notes"},
                headers={"Authorization": f"Bearer u-{index}"},
                timeout=30,
            )
            response.raise_for_status()

    def metrics(self) -> str:
        return scrape(f"{self.base}/metrics/")

    def stop(self) -> None:
        stop_process(self.process)


def _calls_counted_by_pid(directory: Path) -> dict[int, float]:
    """Read each worker's counter file on its own and return the calls it counted."""
    counted = {}
    for path in glob.glob(str(directory / "counter_*.db")):
        pid = int(Path(path).stem.split("_")[1])
        try:
            families = multiprocess.MultiProcessCollector.merge([path], accumulate=False)
        except struct.error:
            # A worker that is starting has created its file but not yet
            # written its header; the caller polls again.
            continue
        counted[pid] = sum(
            sample.value
            for family in families
            if family.name == "llmcost_calls"
            for sample in family.samples
        )
    return counted


def _wait_for_counts(directory: Path, expected: dict[int, float], timeout_seconds: float = 10.0) -> dict:
    """Poll the counter files until they hold `expected`; return the last reading.

    Each worker counts a call on its recorder's writer thread, within the
    recorder's flush interval (0.2 s by default) after the call.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        counted = _calls_counted_by_pid(directory)
        if counted == expected or time.monotonic() > deadline:
            return counted
        time.sleep(0.05)


def _assert_every_worker_serves_totals(server: Gunicorn, calls: int) -> None:
    """Scrape through each worker in turn; every one must return the totals of all.

    A worker counts a call within its recorder's flush interval (0.2 s), so
    a scrape through another worker may lag by that much. Each worker gets
    a few seconds to catch up, and must then serve the exact totals.
    """
    for pid in server.worker_pids():
        deadline = time.monotonic() + 5
        while True:
            with server.pinned(pid):
                exposition = server.metrics()
            if sample_sum(exposition, "llmcost_calls_total") == calls or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        served_by = f"scrape served by worker {pid}"
        assert sample_sum(exposition, "llmcost_calls_total") == calls, served_by
        expected_cost = pytest.approx(calls * EXAMPLE_CALL_COST_USD, abs=1e-9)
        assert sample_sum(exposition, "llmcost_cost_usd_total") == expected_cost, served_by
        assert sample_sum(exposition, "llmcost_call_cost_usd_count") == calls, served_by


@pytest.fixture
def multiproc_env(tmp_path):
    with FakeAnthropicAPI() as api:
        api.set_model_usage(EXAMPLE_MODEL, EXAMPLE_USAGE)
        directory = tmp_path / "prometheus"
        env = example_app_env(
            api.base_url,
            f"sqlite:///{tmp_path / 'costs.db'}",
            PROMETHEUS_MULTIPROC_DIR=str(directory),
        )
        yield env, directory


def test_totals_survive_killed_worker(multiproc_env, tmp_path):
    env, directory = multiproc_env
    server = Gunicorn(env, tmp_path)
    try:
        server.wait_ready()
        workers = server.worker_pids()
        # Worker i serves i + 1 calls: 1 + 2 + 3 + 4 = 10 in all.
        for index, pid in enumerate(workers):
            with server.pinned(pid):
                server.post_summaries(index + 1)

        expected = {pid: index + 1 for index, pid in enumerate(workers)}
        assert _wait_for_counts(directory, expected) == expected
        _assert_every_worker_serves_totals(server, 10)

        victim = workers[-1]
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in server.worker_pids() and len(server.worker_pids()) == WORKERS,
            timeout_seconds=60,
            description="gunicorn to replace the killed worker",
        )
        # child_exit dropped the dead worker's live gauge but kept its counters.
        assert not (directory / f"gauge_livesum_{victim}.db").exists()
        assert (directory / f"counter_{victim}.db").exists()
        wait_for_http(f"{server.base}/healthz", server.process)
        _assert_every_worker_serves_totals(server, 10)
        assert "# TYPE llmcost_recorder_queued_events gauge" in server.metrics()

        replacement = next(pid for pid in server.worker_pids() if pid not in workers)
        with server.pinned(replacement):
            server.post_summaries(5)
        _assert_every_worker_serves_totals(server, 15)
    finally:
        server.stop()
    assert server.process.returncode == 0


def test_restart_starts_from_zero(multiproc_env, tmp_path):
    env, directory = multiproc_env
    first = Gunicorn(env, tmp_path)
    try:
        first.wait_ready()
        first.post_summaries(3)
        _assert_every_worker_serves_totals(first, 3)
    finally:
        first.stop()
    assert glob.glob(str(directory / "counter_*.db")), "the first run left no counter files to wipe"

    second = Gunicorn(env, tmp_path)
    try:
        second.wait_ready()
        _assert_every_worker_serves_totals(second, 0)
        second.post_summaries(1)
        _assert_every_worker_serves_totals(second, 1)
    finally:
        second.stop()

