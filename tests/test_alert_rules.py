"""Alert rules: the built-in queries at their thresholds and windows, and the TOML rules file."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa

from llmcost_mw.alerts import Rule, builtin_rules, check_rule, load_rules, parse_rules
from llmcost_mw.errors import RuleError
from llmcost_mw.events import CostEvent
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage

NOW = datetime(2025, 3, 10, 3, 0)


def cost_row(ts, cost, *, user="alice", feature="chat", model="claude-sonnet-4-5", unpriced=False):
    """Return a `cost_events` row dict, built the way the recorder builds it."""
    event = CostEvent(
        provider="anthropic",
        model=model,
        usage=Usage(input_tokens=100, output_tokens=20),
        ts=ts,
        cost_usd=None if cost is None else Decimal(cost),
        user_id=user,
        feature=feature,
        unpriced=unpriced,
    )
    return event.to_row()


@pytest.fixture
def store(backend_url):
    """The store of each test, on SQLite and on PostgreSQL."""
    store = Store(backend_url)
    yield store
    store.dispose()


def builtin(name, **changes):
    rule = next(rule for rule in builtin_rules() if rule.name == name)
    return dataclasses.replace(rule, **changes)


def evaluate(store, rule, now=NOW):
    store.ensure_schema()
    with store.read() as conn:
        return rule.evaluate(conn, now)


# -- built-in rules at their thresholds ---------------------------------------


@pytest.mark.parametrize(
    ("costs", "fires"),
    [
        pytest.param(["4.99"], False, id="under"),
        pytest.param(["2.50", "2.50"], False, id="at"),
        # 25 x 0.20 sums to 5.000000000000002 in doubles: still "at".
        pytest.param(["0.20"] * 25, False, id="at-with-float-drift"),
        pytest.param(["5.01"], True, id="over"),
        pytest.param(["3.00", "2.01"], True, id="over-in-two-calls"),
    ],
)
def test_user_hourly_spend_threshold(store, costs, fires):
    store.insert_events([cost_row(NOW - timedelta(minutes=30), cost) for cost in costs])

    rows = evaluate(store, builtin("user_hourly_spend"))

    assert [row["entity"] for row in rows] == (["alice"] if fires else [])


def test_user_hourly_spend_counts_last_hour_only(store):
    store.insert_events(
        [
            cost_row(datetime(2025, 3, 10, 0, 10), "4.00"),
            cost_row(datetime(2025, 3, 10, 0, 40), "4.00"),
            cost_row(datetime(2025, 3, 10, 2, 30), "6.00"),
        ]
    )

    rows = evaluate(store, builtin("user_hourly_spend"), now=datetime(2025, 3, 10, 3, 0))

    assert len(rows) == 1
    assert rows[0]["value"] == pytest.approx(6.00)
    assert rows[0]["calls"] == 1


def test_user_hourly_spend_includes_row_at_window_start(store):
    store.insert_events([cost_row(NOW - timedelta(hours=1), "6.00")])

    rows = evaluate(store, builtin("user_hourly_spend"))

    assert [row["entity"] for row in rows] == ["alice"]


def test_user_hourly_spend_skips_rows_without_user(store):
    store.insert_events([cost_row(NOW - timedelta(minutes=5), "40.00", user=None)])

    assert evaluate(store, builtin("user_hourly_spend")) == []


@pytest.mark.parametrize(
    ("costs", "fires"),
    [
        pytest.param(["49.99"], False, id="under"),
        pytest.param(["25.00", "25.00"], False, id="at"),
        pytest.param(["50.01"], True, id="over"),
    ],
)
def test_feature_daily_spend_threshold(store, costs, fires):
    store.insert_events([cost_row(datetime(2025, 3, 10, 1 + i, 0), cost) for i, cost in enumerate(costs)])

    rows = evaluate(store, builtin("feature_daily_spend"), now=datetime(2025, 3, 10, 23, 0))

    assert [row["entity"] for row in rows] == (["chat"] if fires else [])


def test_feature_daily_spend_starts_at_utc_midnight(store):
    store.insert_events(
        [
            cost_row(datetime(2025, 3, 9, 23, 50), "45.00"),
            cost_row(datetime(2025, 3, 10, 0, 5), "10.00"),
        ]
    )

    rows = evaluate(store, builtin("feature_daily_spend"), now=datetime(2025, 3, 10, 0, 30))

    assert rows == []


@pytest.mark.parametrize(
    ("cost", "fires"),
    [
        pytest.param("0.49", False, id="under"),
        pytest.param("0.50", False, id="at"),
        pytest.param("0.51", True, id="over"),
    ],
)
def test_request_cost_threshold(store, cost, fires):
    store.insert_events([cost_row(NOW - timedelta(minutes=10), cost)])

    rows = evaluate(store, builtin("request_cost"))

    assert len(rows) == (1 if fires else 0)


def test_request_cost_returns_each_request(store):
    store.insert_events(
        [cost_row(NOW - timedelta(minutes=m), cost) for m, cost in [(5, "0.60"), (6, "0.82"), (7, "0.10")]]
    )

    rows = evaluate(store, builtin("request_cost"))

    assert sorted(row["value"] for row in rows) == pytest.approx([0.60, 0.82])
    assert all(row["entity"].isdigit() for row in rows)


@pytest.mark.parametrize(
    ("unpriced_calls", "threshold", "fires"),
    [
        pytest.param(0, 0, False, id="none"),
        pytest.param(1, 0, True, id="one-call"),
        pytest.param(2, 3, False, id="under-raised-threshold"),
        pytest.param(3, 3, False, id="at-raised-threshold"),
        pytest.param(4, 3, True, id="over-raised-threshold"),
    ],
)
def test_unpriced_model_threshold(store, unpriced_calls, threshold, fires):
    rows = [cost_row(NOW - timedelta(minutes=1), None, model="mystery-1", unpriced=True)] * unpriced_calls
    store.insert_events([dict(row, event_id=f"e{i}") for i, row in enumerate(rows)])
    store.insert_events([cost_row(NOW - timedelta(minutes=1), "0.01")])

    result = evaluate(store, builtin("unpriced_model", params={"threshold": threshold}))

    assert [row["entity"] for row in result] == (["mystery-1"] if fires else [])


def test_unpriced_model_ignores_calls_before_last_hour(store):
    store.insert_events([cost_row(NOW - timedelta(minutes=61), None, model="mystery-1", unpriced=True)])

    assert evaluate(store, builtin("unpriced_model")) == []


def test_unpriced_model_ignores_unknown_usage(store):
    # A chat stream without include_usage: the model has a price, the usage is missing.
    unknown_usage = [
        dict(cost_row(NOW - timedelta(minutes=1), None, model="gpt-4.1", unpriced=True), flags=flags)
        for flags in ["usage_unknown", "context_missing,usage_unknown"]
    ]
    missing_price = dict(cost_row(NOW - timedelta(minutes=1), None, model="mystery-1", unpriced=True), flags=None)
    store.insert_events([*unknown_usage, missing_price])

    result = evaluate(store, builtin("unpriced_model"))

    assert [row["entity"] for row in result] == ["mystery-1"]


def test_builtin_rules_run_against_store(store):
    store.ensure_schema()
    with store.read() as conn:
        for rule in builtin_rules():
            assert "entity" in check_rule(rule, conn), rule.name


def test_entity_thresholds_override_default(store):
    store.insert_events(
        [
            cost_row(NOW - timedelta(minutes=5), "2.00", user="alice"),
            cost_row(NOW - timedelta(minutes=5), "2.00", user="bob"),
        ]
    )
    rule = Rule(
        name="baseline_spend",
        sql=(
            "SELECT user_id AS entity, SUM(cost_usd) AS value "
            "FROM cost_events WHERE ts >= :since GROUP BY user_id"
        ),
        params={"threshold": 5.0},
        title="{entity}",
        message="{value} over {threshold}",
        entity_thresholds=lambda conn, binds: {"alice": 1.0},
    )

    rows = evaluate(store, rule)

    assert [(row["entity"], row["threshold"]) for row in rows] == [("alice", 1.0)]


def test_rule_binds_datetimes_typed(store):
    rule = builtin("user_hourly_spend")

    binds = rule.binds(NOW)

    assert binds["since"] == NOW - timedelta(hours=1)
    assert binds["day_start"] == datetime(2025, 3, 10)
    assert binds["threshold"] == 5.0
    compiled = rule.bound_sql(NOW).compile(dialect=store.engine.dialect)
    assert isinstance(compiled.binds["since"].type, sa.DateTime)


# -- rules file ------------------------------------------------------------------


def test_rules_file_overrides_builtin(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        "[rules.user_hourly_spend]\n"
        "cooldown_seconds = 1800\n"
        "priority = 5\n"
        'title = "Budget ⚠ über {threshold:.0f} $ — {entity}"\n'
        "params = { threshold = 10.0 }\n"
        "\n"
        "[rules.unpriced_model]\n"
        "enabled = false\n",
        encoding="utf-8",
    )

    rules = {rule.name: rule for rule in load_rules(path)}

    assert set(rules) == {"user_hourly_spend", "feature_daily_spend", "request_cost", "request_shape"}
    user_rule = rules["user_hourly_spend"]
    assert user_rule.params == {"threshold": 10.0}
    assert user_rule.cooldown_seconds == 1800
    assert user_rule.priority == 5
    assert user_rule.title.startswith("Budget ⚠ über")
    assert rules["request_cost"].params == {"threshold": 0.50}


def test_rules_file_adds_rule(store, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(
        "[rules.opus_spend]\n"
        "sql = '''\n"
        "  SELECT feature AS entity, SUM(cost_usd) AS value\n"
        "  FROM cost_events\n"
        "  WHERE ts >= :since AND model LIKE 'claude-opus%'\n"
        "  GROUP BY feature\n"
        "  HAVING SUM(cost_usd) > :threshold  -- a trailing comment\n"
        "'''\n"
        "params = { threshold = 1.0 }\n"
        'title = "Opus spend of {entity}"\n'
        'message = "{entity} spent ${value:.2f} on Opus"\n'
        'tags = ["moneybag"]\n'
        'window = "day"\n',
        encoding="utf-8",
    )
    store.insert_events(
        [
            cost_row(NOW - timedelta(minutes=5), "2.00", feature="search", model="claude-opus-4-1"),
            cost_row(NOW - timedelta(minutes=5), "2.00", feature="chat", model="claude-haiku-4-5"),
        ]
    )

    rules = load_rules(path, store=store)

    rule = rules[-1]
    assert (rule.name, rule.window, rule.tags) == ("opus_spend", "day", ("moneybag",))
    assert [row["entity"] for row in evaluate(store, rule)] == ["search"]


NEW_RULE = (
    "[rules.big_users]\n"  # line 1
    'sql = "SELECT user_id AS entity, SUM(cost_usd) AS value FROM cost_events WHERE ts >= :since '
    'GROUP BY user_id HAVING SUM(cost_usd) > :threshold"\n'  # line 2
    "params = { threshold = 1.0 }\n"  # line 3
    'title = "{entity}"\n'  # line 4
    'message = "{entity} spent {value}"\n'  # line 5
)


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        pytest.param(NEW_RULE + "colour = 'red'\n", 6, "unknown key 'colour'", id="unknown-key"),
        pytest.param(
            "\n[rules.user_hourly_spend]\nthreshold = 10\n",
            3,
            "put it under [rules.user_hourly_spend.params]",
            id="threshold-outside-params",
        ),
        pytest.param(
            '[rules.big_users]\ntitle = "{entity}"\nmessage = "m"\n', 1, "missing 'sql'", id="missing-sql"
        ),
        pytest.param(NEW_RULE + 'priority = "high"\n', 6, "priority must be an integer", id="priority-type"),
        pytest.param(NEW_RULE + "priority = 9\n", 6, "invalid priority 9", id="priority-range"),
        pytest.param(
            NEW_RULE + "cooldown_seconds = -5\n", 6, "invalid cooldown_seconds", id="negative-cooldown"
        ),
        pytest.param(NEW_RULE + "tags = 'moneybag'\n", 6, "tags must be an array", id="tags-type"),
        pytest.param(NEW_RULE + "window = 'week'\n", 6, "invalid window 'week'", id="unknown-window"),
        pytest.param(NEW_RULE.replace(":threshold", ":limit"), 2, "unknown bind :limit", id="unknown-bind"),
        pytest.param(
            NEW_RULE.replace("SUM(cost_usd) AS value", "SUM(costs) AS value"),
            2,
            "no such column: costs",
            id="unknown-column",
        ),
        pytest.param(
            NEW_RULE.replace("GROUP BY", "GROUP user_id BY"), 2, "the sql failed", id="syntax-error"
        ),
        pytest.param(
            NEW_RULE.replace("user_id AS entity", "user_id AS who"),
            2,
            "no 'entity' column",
            id="no-entity-column",
        ),
        pytest.param(
            NEW_RULE.replace("{entity} spent {value}", "{entity} spent {amount}"),
            5,
            "uses amount",
            id="unknown-template-field",
        ),
        pytest.param(
            NEW_RULE.replace('title = "{entity}"', 'title = "{entity"'),
            4,
            "invalid title template",
            id="bad-template",
        ),
        pytest.param(
            "[rules.request_cost]\nparams = { treshold = 1.0 }\n",
            2,
            "unknown param 'treshold'",
            id="unknown-param",
        ),
        pytest.param(
            "[rules.request_cost]\n[rules.request_cost.params]\nthreshold = 'one'\n",
            3,
            "must be a number",
            id="param-type",
        ),
        pytest.param("[rules.request_cost]\nsql = 'SELECT 1'\n", 2, "cannot be replaced", id="builtin-sql"),
        pytest.param(
            "[rules.request_cost]\n[rules.request_cost.params]\nthreshold = -0.5\n",
            3,
            "invalid param 'threshold' = -0.5: use a number >= 0",
            id="negative-threshold",
        ),
        pytest.param(
            "[rules.feature_daily_spend]\n[rules.feature_daily_spend.params]\nbaseline_percentile = 150\n",
            3,
            "use a number above 0 and at most 100",
            id="percentile-range",
        ),
        pytest.param(
            "[rules.feature_daily_spend]\n[rules.feature_daily_spend.params]\nbaseline_factor = 0\n",
            3,
            "invalid param 'baseline_factor' = 0: use a number above 0",
            id="zero-factor",
        ),
        pytest.param(
            "[rules.request_shape]\n[rules.request_shape.params]\nmin_calls = 2.5\n",
            3,
            "use a whole number",
            id="fractional-count",
        ),
        pytest.param(
            "[rules.user_hourly_spend]\n[rules.user_hourly_spend.params]\nthreshold = nan\n",
            3,
            "use a finite number",
            id="nan-threshold",
        ),
        pytest.param(NEW_RULE.replace("1.0 }", "inf }"), 3, "use a finite number", id="inf-param"),
        pytest.param(NEW_RULE + "timeout_seconds = 0\n", 6, "invalid timeout_seconds 0", id="zero-timeout"),
        pytest.param(
            NEW_RULE.replace("SELECT user_id", "DELETE FROM cost_events; SELECT user_id"),
            2,
            "the sql failed",
            id="not-a-select",
        ),
    ],
)
def test_rules_file_error_names_rule_and_line(text, line, problem):
    with pytest.raises(RuleError) as caught:
        parse_rules(text, source="rules.toml")

    message = str(caught.value)
    assert f"rules.toml, line {line}: " in message
    assert "rule '" in message
    assert problem in message


def test_rules_file_invalid_toml_names_line():
    with pytest.raises(RuleError, match=r"rules\.toml: invalid TOML: .*line 2"):
        parse_rules("[rules.a]\nsql = \n", source="rules.toml")


def test_rules_file_missing(tmp_path):
    with pytest.raises(RuleError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.toml")


def test_rule_rejects_bad_name():
    with pytest.raises(RuleError, match="invalid rule name"):
        Rule(name="has space", sql="SELECT 1 AS entity", title="t", message="m")
