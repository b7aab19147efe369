"""The deployment files name real commands and keep the watcher running."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

from llmcost_mw.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / "llmcost-watch.service")
    return parser


def test_unit_restarts_always():
    unit = _unit()

    assert unit["Service"]["Restart"] == "always"
    assert unit["Service"]["KillSignal"] == "SIGTERM"
    assert unit["Service"]["ExecStart"].endswith("llmcost watch")


def test_unit_command_parses():
    command = _unit()["Service"]["ExecStart"].split()[1:]

    args = build_parser().parse_args(command)

    assert args.command == "watch"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze(tmp_path):
    unit = tmp_path / "llmcost-watch.service"
    unit.write_text((DEPLOY / "systemd" / "llmcost-watch.service").read_text())

    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)

    assert "Unknown key" not in result.stderr
    assert "Unknown section" not in result.stderr


def test_container_runs_watch():
    text = (DEPLOY / "container" / "Containerfile").read_text()

    assert 'ENTRYPOINT ["llmcost", "watch"]' in text
    assert "STOPSIGNAL SIGTERM" in text
    assert "USER llmcost" in text
