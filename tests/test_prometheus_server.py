"""A real Prometheus server scrapes the FastAPI example and `llmcost exporter` while traffic runs.

The example runs under uvicorn with the real SDK talking to the local fake
API. Prometheus (Debian's package) runs on 127.0.0.1 with a 1 s scrape
interval, a temporary data directory and the rules in deploy/prometheus. Its
HTTP API must return the same total cost as `SELECT SUM(cost_usd)` on the store.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import requests
import sqlalchemy as sa

from llmcost_mw.demo.fake_api import FakeAnthropicAPI
from llmcost_mw.store import Store, cost_events
from servers import (
    REPO_ROOT,
    example_app_env,
    free_port,
    require_binary,
    sample_sum,
    scrape,
    stop_process,
    wait_for_http,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

SCRAPE_INTERVAL = "1s"
# 440,000 characters are about 110,000 input tokens on the fake API: $0.55 on
# claude-opus-4-8 at $5 per million, one call above the $0.50 ceiling.
LARGE_DOCUMENT = "a long contract clause " * 19_131


def _prometheus_config(app_port: int, exporter_port: int) -> str:
    return f"""
global:
  scrape_interval: {SCRAPE_INTERVAL}
  evaluation_interval: {SCRAPE_INTERVAL}
rule_files:
  - {RULES_PATH}
scrape_configs:
  - job_name: llmcost-app
    metrics_path: /metrics/
    static_configs:
      - targets: ["127.0.0.1:{app_port}"]
  - job_name: llmcost-store
    static_configs:
      - targets: ["127.0.0.1:{exporter_port}"]
"""


RULES_PATH = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"


class PrometheusAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expression: str) -> list[dict]:
        response = requests.get(f"{self.base}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, expression: str) -> float | None:
        result = self.query(expression)
        return float(result[0]["value"][1]) if result else None

    def firing(self, alertname: str) -> list[dict]:
        response = requests.get(f"{self.base}/api/v1/alerts", timeout=10)
        response.raise_for_status()
        return [
            alert
            for alert in response.json()["data"]["alerts"]
            if alert["state"] == "firing" and alert["labels"]["alertname"] == alertname
        ]

    def rules(self) -> list[dict]:
        response = requests.get(f"{self.base}/api/v1/rules", timeout=10)
        response.raise_for_status()
        return [rule for group in response.json()["data"]["groups"] for rule in group["rules"]]


def _post(base: str, path: str, user: str, body: dict) -> None:
    headers = {"Authorization": f"Bearer {user}"}
    response = requests.post(f"{base}{path}", json=body, headers=headers, timeout=60)
    response.raise_for_status()


def _drive_traffic(base: str) -> None:
    """Send demo-like traffic: summaries, streamed chats, a tool loop and one large translation."""

    def post(path: str, user: str, body: dict) -> None:
        _post(base, path, user, body)

    for n in range(6):
        post(f"/summarize/doc-{n}", "u-7", {"text": "Minutes of the planning meeting. " * (20 + n)})
    for n in range(4):
        post("/chat", "u-3", {"message": f"Question {n}: how do I rotate my API key?"})
    post("/agent/weather", "u-9", {"prompt": "Should I cycle to work tomorrow in Lyon?"})
    post("/translate", "u-2", {"text": LARGE_DOCUMENT})
    for n in range(6):
        post(f"/summarize/big-{n}", "u-loop", {"text": "quarterly figures and notes " * 2_000})


def _sql_totals(store: Store) -> tuple[float, int]:
    with store.read() as conn:
        cost, calls = conn.execute(sa.select(sa.func.sum(cost_events.c.cost_usd), sa.func.count())).one()
    return float(cost or 0), int(calls)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Start the fake API, the example app, the store exporter and Prometheus; stop them all afterwards.

    The tests below share one stack, and the last one stops the app, so they
    run in file order.
    """
    prometheus = require_binary("prometheus")
    tmp_path = tmp_path_factory.mktemp("prometheus-stack")
    database_url = f"sqlite:///{tmp_path / 'costs.db'}"
    processes: list[subprocess.Popen] = []
    with FakeAnthropicAPI() as api:
        try:
            app_port, exporter_port, prometheus_port = free_port(), free_port(), free_port()
            app = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "examples.fastapi_app.app:app", "--host", "127.0.0.1",
                 "--port", str(app_port), "--log-level", "warning"],
                cwd=tmp_path,
                env=example_app_env(api.base_url, database_url),
            )
            processes.append(app)
            app_base = f"http://127.0.0.1:{app_port}"
            wait_for_http(f"{app_base}/healthz", app)

            # The exporter needs the schema, which the app creates on its first write.
            Store(database_url).ensure_schema()
            exporter = subprocess.Popen(
                [sys.executable, "-m", "llmcost_mw.cli", "exporter", "--database-url", database_url,
                 "--port", str(exporter_port)],
                cwd=tmp_path,
            )
            processes.append(exporter)
            wait_for_http(f"http://127.0.0.1:{exporter_port}/metrics", exporter)

            config = tmp_path / "prometheus.yml"
            config.write_text(_prometheus_config(app_port, exporter_port), encoding="utf-8")
            server = subprocess.Popen(
                [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
                cwd=tmp_path,
            )
            processes.append(server)
            prometheus_base = f"http://127.0.0.1:{prometheus_port}"
            wait_for_http(f"{prometheus_base}/-/ready", server)

            yield app_base, app, PrometheusAPI(prometheus_base), Store(database_url)
        finally:
            for process in reversed(processes):
                stop_process(process)


def test_rules_evaluate_on_real_server(stack):
    app_base, _app, prometheus, _store = stack
    _post(app_base, "/translate", "u-2", {"text": LARGE_DOCUMENT})

    # The translate series is new, with its first call already above $0.50.
    wait_until(
        lambda: prometheus.firing("LLMSingleCallOverCeiling"),
        timeout_seconds=60,
        description="LLMSingleCallOverCeiling to fire",
    )
    alert = prometheus.firing("LLMSingleCallOverCeiling")[0]
    assert alert["labels"]["feature"] == "/translate"
    assert alert["labels"]["model"] == "claude-opus-4-8"
    assert all(rule["health"] == "ok" for rule in prometheus.rules()), prometheus.rules()


def test_promtool_accepts_app_scrape(stack):
    promtool = require_binary("promtool")
    app_base, _app, _prometheus, _store = stack
    _post(app_base, "/summarize/doc-1", "u-1", {"text": "hello"})

    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(f"{app_base}/metrics/"), capture_output=True, text=True,
        timeout=30,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout
    assert result.stderr.strip() == "", result.stderr


def test_prometheus_total_matches_sql(stack):
    app_base, app, prometheus, store = stack

    # Prometheus scrapes every second while the traffic runs.
    traffic = threading.Thread(target=_drive_traffic, args=(app_base,))
    traffic.start()
    wait_until(lambda: prometheus.scalar("sum(llmcost_calls_total)") is not None, timeout_seconds=60,
               description="Prometheus to scrape the first calls")
    traffic.join(timeout=120)
    assert not traffic.is_alive(), "the traffic did not finish within 120 s"

    # Once the app's own /metrics and Prometheus agree, take Prometheus's totals.
    app_metrics = scrape(f"{app_base}/metrics/")
    app_cost = sample_sum(app_metrics, "llmcost_cost_usd_total")
    wait_until(
        lambda: prometheus.scalar("sum(llmcost_cost_usd_total)") == pytest.approx(app_cost, abs=1e-9),
        timeout_seconds=30,
        description="Prometheus to scrape the final totals",
    )
    prometheus_cost = prometheus.scalar("sum(llmcost_cost_usd_total)")
    prometheus_calls = prometheus.scalar("sum(llmcost_calls_total)")

    # SIGTERM: the app writes its queued rows before it exits.
    stop_process(app)
    sql_cost, sql_calls = _sql_totals(store)

    # The traffic makes 20 calls (the tool loop makes 3); the tests above add theirs.
    assert sql_calls >= 20
    assert sql_calls == sample_sum(app_metrics, "llmcost_calls_total")
    assert prometheus_calls == sql_calls
    assert round(prometheus_cost, 2) == round(sql_cost, 2)
    assert prometheus_cost == pytest.approx(sql_cost, abs=0.005)

    # The exporter reads the same rows from the store.
    wait_until(
        lambda: prometheus.scalar("sum(llmcost_store_calls_total)") == sql_calls,
        timeout_seconds=30,
        description="Prometheus to scrape the exporter's totals",
    )
    assert prometheus.scalar("sum(llmcost_store_cost_usd_total)") == pytest.approx(sql_cost, abs=0.005)
