"""deploy/prometheus: promtool checks the rules and config and runs the rule unit tests."""

from __future__ import annotations

import re
import subprocess
from decimal import Decimal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmcost_mw.events import CostEvent
from llmcost_mw.exporter import StoreCollector
from llmcost_mw.metrics import Metrics
from llmcost_mw.usage import Usage
from servers import REPO_ROOT, promql_metric_names, require_binary

RULES_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES = RULES_DIR / "rules.yml"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    promtool = require_binary("promtool")
    return subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_rules_pass_check():
    result = _promtool("check", "rules", "rules.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rule_unit_tests_pass():
    result = _promtool("test", "rules", "rules_test.yml")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_config_passes_check():
    result = _promtool("check", "config", "prometheus.yml")

    assert result.returncode == 0, result.stdout + result.stderr


def _rule_expressions(text: str) -> list[str]:
    """Return every `expr:` of a rules file, inline or as a `|` block, without a YAML parser."""
    expressions = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not match:
            continue
        indent, inline = len(match.group(1)), match.group(2).strip()
        if inline and inline != "|":
            expressions.append(inline)
            continue
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        expressions.append("\n".join(block))
    return expressions


def _exported_sample_names(store) -> set[str]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    usage = Usage(input_tokens=10, output_tokens=4)
    priced = CostEvent(provider="anthropic", model="m", usage=usage, feature="f", cost_usd=Decimal("0.7"))
    metrics.observe(priced)
    metrics.observe(CostEvent(provider="anthropic", model="n", usage=usage, feature="f", unpriced=True))
    store.insert_events([priced.to_row()])
    registry.register(StoreCollector(store))
    return {
        sample.name
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def test_rules_use_exported_metrics(store):
    text = RULES.read_text(encoding="utf-8")
    recorded = set(re.findall(r"^\s*- record:\s*(\S+)\s*$", text, flags=re.MULTILINE))
    known = _exported_sample_names(store) | recorded
    expressions = _rule_expressions(text)

    assert len(expressions) == 8
    for expression in expressions:
        names = promql_metric_names(expression)
        assert names, expression
        assert names <= known, f"{expression!r} names {names - known}"
