"""`llmcost prices`: every listed price names its source and check date; `--compare` reports drift."""

from __future__ import annotations

import re
import tomllib
from importlib import resources

import pytest

from llmcost_mw.cli import main

URL = re.compile(r"^https?://\S+$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def bundled_table() -> dict:
    return tomllib.loads(resources.files("llmcost_mw").joinpath("data/prices.toml").read_text("utf-8"))


def model_blocks(listing: str) -> dict[str, list[str]]:
    """Split the listing into model blocks: a line at column 0 opens one, indented lines belong to it.

    The title line and the table-wide values come first, each followed by a
    blank line, and are left out.
    """
    body = listing.partition("\n\n")[2].partition("\n\n")[2]
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in body.splitlines():
        if not line.startswith(" "):
            current = blocks.setdefault(line.split(" ")[0], [])
        else:
            current.append(line)
    return blocks


def field_values(lines: list[str], name: str, indent: str = "  ") -> list[str]:
    prefix = f"{indent}{name}: "
    return [line[len(prefix) :] for line in lines if line.startswith(prefix)]


def run_prices(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["prices", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_listing_every_model_has_source_and_checked(capsys):
    code, out, _err = run_prices(capsys)
    blocks = model_blocks(out)

    assert code == 0
    assert sorted(blocks) == sorted(row["id"] for row in bundled_table()["models"])
    for model, lines in blocks.items():
        sources = field_values(lines, "source")
        checked = field_values(lines, "checked")
        assert len(sources) == 1, model
        assert len(checked) == 1, model
        assert URL.match(sources[0]), f"{model}: source {sources[0]!r} is not a URL"
        assert DATE.match(checked[0]), f"{model}: checked {checked[0]!r} is not YYYY-MM-DD"


def test_listing_fast_mode_has_own_source(capsys):
    _code, out, _err = run_prices(capsys)
    blocks = model_blocks(out)
    fast_models = sorted(row["id"] for row in bundled_table()["models"] if "fast_mode" in row)

    listed = sorted(model for model, lines in blocks.items() if any("fast mode" in line for line in lines))

    assert fast_models
    assert listed == fast_models
    for model in fast_models:
        fast_sources = field_values(blocks[model], "source", indent="    ")
        fast_checked = field_values(blocks[model], "checked", indent="    ")
        assert len(fast_sources) == 1, model
        assert URL.match(fast_sources[0]), model
        assert len(fast_checked) == 1, model
        assert DATE.match(fast_checked[0]), model


def test_listing_header_tables_have_sources(capsys):
    _code, out, _err = run_prices(capsys)
    header = out.partition("\n\n")[2].partition("\n\n")[0].splitlines()

    sources = field_values(header, "source")
    checked = field_values(header, "checked")

    # [batch], [server_tools] and [inference_geo].
    assert len(sources) == 3
    assert all(URL.match(value) for value in sources)
    assert all(DATE.match(value) for value in checked)
    assert header[0] == "batch multiplier 0.5 on every token bucket"


def test_listing_shows_long_context_tier(capsys):
    _code, out, _err = run_prices(capsys)

    lines = model_blocks(out)["claude-sonnet-4-20250514"]

    long_context = "input=6 output=22.5 cache_write_5m=7.5 cache_write_1h=12 cache_read=0.6"
    assert f"  above 200000 prompt tokens: {long_context}" in lines
    assert "  aliases: claude-sonnet-4-0" in lines


MINIMAL_ROW = """
[[models]]
id = "claude-test-1"
input = "3"
output = "15"
cache_write_5m = "3.75"
cache_write_1h = "6"
cache_read = "0.30"
"""


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        pytest.param('checked = "2026-01-01"\n', "source", id="no-source"),
        pytest.param('source = "https://example.invalid/pricing"\n', "checked", id="no-checked"),
        pytest.param('source = ""\nchecked = "2026-01-01"\n', "source", id="empty-source"),
    ],
)
def test_row_without_source_or_date_rejected(capsys, tmp_path, extra, missing):
    path = tmp_path / "prices.toml"
    path.write_text('version = "test"\n' + MINIMAL_ROW + extra, encoding="utf-8")

    code, out, err = run_prices(capsys, "--file", str(path))

    assert code == 2
    assert out == ""
    assert "claude-test-1" in err
    assert f"no `{missing}`" in err


def test_fast_mode_without_source_rejected(capsys, tmp_path):
    path = tmp_path / "prices.toml"
    path.write_text(
        'version = "test"\n'
        + MINIMAL_ROW
        + 'source = "https://example.invalid/pricing"\nchecked = "2026-01-01"\n'
        + '[models.fast_mode]\ninput = "6"\noutput = "30"\ncache_write_5m = "7.5"\n'
        + 'cache_write_1h = "12"\ncache_read = "0.6"\nchecked = "2026-01-01"\n',
        encoding="utf-8",
    )

    code, _out, err = run_prices(capsys, "--file", str(path))

    assert code == 2
    assert "fast_mode" in err
    assert "no `source`" in err


def test_missing_file_is_config_error(capsys, tmp_path):
    code, _out, err = run_prices(capsys, "--file", str(tmp_path / "absent.toml"))

    assert code == 2
    assert "absent.toml" in err


def test_compare_bundled_no_drift(capsys):
    import genai_prices

    code, out, _err = run_prices(capsys, "--compare")
    lines = out.splitlines()
    model_count = len(bundled_table()["models"])

    assert code == 0
    assert lines[0] == f"compared {model_count} models with genai-prices {genai_prices.__version__}"
    assert lines[1] == "no prices differ"
    assert lines[2].startswith("not in genai-prices: ")
    assert "claude-mythos-5" in lines[2]


def test_compare_reports_changed_price(capsys, tmp_path):
    table = (
        'version = "test"\n'
        "[[models]]\n"
        'id = "claude-sonnet-4-5-20250929"\n'
        'input = "4"\noutput = "15"\ncache_write_5m = "3.75"\ncache_write_1h = "6"\ncache_read = "0.30"\n'
        'source = "https://example.invalid/pricing"\nchecked = "2026-01-01"\n'
        "[[models]]\n"
        'id = "claude-not-a-real-model-1"\n'
        'input = "1"\noutput = "5"\ncache_write_5m = "1.25"\ncache_write_1h = "2"\ncache_read = "0.10"\n'
        'source = "https://example.invalid/pricing"\nchecked = "2026-01-01"\n'
    )
    path = tmp_path / "prices.toml"
    path.write_text(table, encoding="utf-8")

    code, out, _err = run_prices(capsys, "--file", str(path), "--compare")
    lines = out.splitlines()

    assert code == 1
    assert lines[0].startswith("compared 2 models with genai-prices ")
    assert lines[1] == "1 differ:"
    assert lines[2] == "  claude-sonnet-4-5-20250929: input ours=4 genai-prices=3"
    assert lines[3] == "not in genai-prices: claude-not-a-real-model-1"
