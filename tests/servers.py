"""Helpers for tests that start real servers on 127.0.0.1: ports, start-up waits, scrapes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]

# The example's usage from test_example_app: $0.054399 per call on claude-sonnet-4-6.
EXAMPLE_MODEL = "claude-sonnet-4-6"
EXAMPLE_USAGE = {
    "input_tokens": 3,
    "cache_creation_input_tokens": 12304,
    "cache_read_input_tokens": 0,
    "output_tokens": 550,
}
EXAMPLE_CALL_COST_USD = 0.054399


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def require_binary(name: str) -> str:
    """Return the path of `name`; skip the test when it is missing, or fail when CI=true."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: apt-get install -y --no-install-recommends prometheus)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires it")
    pytest.skip(message)


def wait_until(
    condition: Callable[[], bool], *, timeout_seconds: float, description: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds:.0f} s waiting for {description}")
        time.sleep(interval)


def wait_for_http(url: str, process: subprocess.Popen, *, timeout_seconds: float = 30.0) -> None:
    """Wait until `url` responds with 2xx, failing at once if `process` exits first."""

    def responds() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"{process.args[0]} exited with status {process.returncode} before {url} responded"
            )
        try:
            return requests.get(url, timeout=1).ok
        except requests.RequestException:
            return False

    wait_until(responds, timeout_seconds=timeout_seconds, description=url)


def stop_process(process: subprocess.Popen, *, timeout_seconds: float = 30.0) -> None:
    """Stop with SIGTERM so that servers flush what they hold; kill after the timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def example_app_env(api_base_url: str, database_url: str, **extra: str) -> dict[str, str]:
    """Return the environment for the example app: the local fake API, a temp store, no proxies."""
    env = dict(os.environ)
    for name in ("ANTHROPIC_AUTH_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(name, None)
    env.update(
        ANTHROPIC_BASE_URL=api_base_url,
        ANTHROPIC_API_KEY="test-key",
        LLMCOST_DATABASE_URL=database_url,
        PYTHONPATH=str(REPO_ROOT),
        NO_PROXY="127.0.0.1,localhost",
        **extra,
    )
    return env


def scrape(url: str) -> str:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return response.text


def sample_sum(exposition: str, sample_name: str, **label_filter: str) -> float:
    """Sum every sample named `sample_name` whose labels include `label_filter`."""
    total = 0.0
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name != sample_name:
                continue
            if all(sample.labels.get(key) == value for key, value in label_filter.items()):
                total += sample.value
    return total


# -- the metric tables of docs/metrics.md ---------------------------------------

METRICS_DOC = REPO_ROOT / "docs" / "metrics.md"
IN_PROCESS_SECTION = "In-process metrics"
EXPORTER_SECTION = "Store exporter metrics"


def documented_metrics(section: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Return {metric name: (type, label names)} from the table under `## <section>` in docs/metrics.md."""
    text = METRICS_DOC.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for line in body.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        name, metric_type, _unit, labels = cells[0].strip("`"), cells[1], cells[2], cells[3]
        label_names = frozenset()
        if labels != "none":
            label_names = frozenset(label.strip() for label in labels.split(","))
        metrics[name] = (metric_type, label_names)
    return metrics


def scraped_metrics(exposition: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Return {metric name: (type, label names)} of an exposition, without the `_created` gauges.

    Counters keep their `_total` suffix; histogram label names leave out `le`.
    """
    metrics = {}
    for family in text_string_to_metric_families(exposition):
        if family.name.endswith("_created"):
            continue
        name = family.name + "_total" if family.type == "counter" else family.name
        label_names = frozenset(
            label for sample in family.samples for label in sample.labels if label != "le"
        )
        metrics[name] = (family.type, label_names)
    return metrics


# -- metric names in PromQL expressions ------------------------------------------

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
)
_STRIP_PATTERNS = (
    re.compile(r'"(?:[^"\\]|\\.)*"'),                                # string literals
    re.compile(r"\{[^}]*\}"),                                        # label matchers
    re.compile(r"\[[^\]]*\]"),                                       # range and subquery windows
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),  # label lists
    re.compile(r"\$\{?\w+\}?"),                                      # Grafana variables
)
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")


def promql_metric_names(expression: str) -> set[str]:
    """Return the metric names that a PromQL expression selects.

    They are the identifiers left once functions, keywords and labels are removed.
    """
    for pattern in _STRIP_PATTERNS:
        expression = pattern.sub(" ", expression)
    return {
        name
        for name in _IDENTIFIER.findall(expression)
        if name not in _PROMQL_KEYWORDS and not re.fullmatch(r"\d+\w*", name)
    }
