"""Values that a client controls never stop recording, on SQLite or PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from llmcost_mw.events import CostEvent
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage


def _event(**fields) -> CostEvent:
    values = {"provider": "anthropic", "model": "claude-sonnet-4-6", "usage": Usage(input_tokens=10)}
    values.update(fields)
    return CostEvent(**values)


def test_oversized_values_are_cut(backend_url):
    store = Store(backend_url)
    events = [
        _event(request_id="A" * 100),
        _event(user_id="u" * 300, feature="f" * 300),
        _event(user_id="evil\x00user"),
        _event(user_id="fine"),
    ]

    inserted = store.insert_events([event.to_row() for event in events])
    rows = store.fetch_events()

    assert inserted == 4
    assert len(rows[0]["request_id"]) == 64
    assert len(rows[1]["user_id"]) == 255
    assert len(rows[1]["feature"]) == 255
    assert rows[2]["user_id"] == "eviluser"
    assert [row["flags"] for row in rows] == ["value_truncated"] * 3 + [None]
    store.dispose()


def test_bad_value_does_not_block_batch(backend_url, tmp_path):
    store = Store(backend_url)
    recorder = Recorder(store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05)

    for n in range(5):
        recorder.record(_event(request_id="x" * (60 + n * 10), response_id=f"msg_{n}"))
    written = recorder.flush(timeout_seconds=10)

    assert written
    assert store.count_events() == 5
    recorder.close()
    store.dispose()


def _record_all(store, tmp_path, events, **options):
    """Record events one after another, then wait for the writer; return whether everything was written."""
    recorder = Recorder(store, spill_path=tmp_path / "spill.jsonl", flush_interval_seconds=0.05, **options)
    for event in events:
        recorder.record(event)
        # One event per batch, like a quiet app: a bad row has no neighbours.
        assert recorder.flush(timeout_seconds=10)
    flushed = recorder.flush(timeout_seconds=10)
    recorder.close(timeout_seconds=2)
    return flushed


def _rejected_ids(tmp_path) -> list[str]:
    path = tmp_path / "spill.jsonl.rejected"
    if not path.exists():
        return []
    return [json.loads(line)["row"]["event_id"] for line in path.read_text("utf-8").splitlines()]


def test_unbindable_value_set_aside_alone(backend_url, tmp_path):
    # An integer over 64 bits fails in the driver, before any SQL runs.
    store = Store(backend_url)
    poison = _event(latency_ms=1.0)
    poison.usage = Usage(input_tokens=10**20)
    events = [_event(), poison, _event(), _event()]

    flushed = _record_all(store, tmp_path, events)
    stored = {row["event_id"] for row in store.fetch_events()}
    store.dispose()

    assert flushed is True
    assert stored == {event.event_id for event in events} - {poison.event_id}
    assert _rejected_ids(tmp_path) == [poison.event_id]


def test_hostile_text_values_stored_cleaned(backend_url, tmp_path):
    store = Store(backend_url)
    events = [
        _event(response_id="msg_\ud800"),  # a lone surrogate, which UTF-8 cannot encode
        _event(model=12345),  # a number where the API sent one
        _event(usage=Usage(service_tier="t" * 40)),
        _event(usage=Usage(service_tier="pri\x00ority")),
    ]

    flushed = _record_all(store, tmp_path, events)
    rows = store.fetch_events()
    store.dispose()

    assert flushed is True
    assert [row["event_id"] for row in rows] == [event.event_id for event in events]
    assert rows[0]["response_id"] == "msg_?"
    assert rows[1]["model"] == "12345"
    assert rows[2]["service_tier"] == "t" * 32
    assert rows[3]["service_tier"] == "priority"
    assert {row["flags"] for row in rows} == {"value_truncated"}
    assert _rejected_ids(tmp_path) == []


def test_aware_timestamp_stored_as_utc(backend_url, tmp_path):
    store = Store(backend_url)
    if store.dialect == "postgresql":
        # A session time zone other than UTC would shift an aware timestamp.
        with store.write() as conn:
            database = conn.exec_driver_sql("SELECT current_database()").scalar()
            conn.exec_driver_sql(f"ALTER DATABASE \"{database}\" SET timezone = 'America/New_York'")
        store.dispose()
    noon_utc = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    live = _event(ts=noon_utc.astimezone(timezone(timedelta(hours=2))))
    by_dict = _event(ts=noon_utc.astimezone(timezone(timedelta(hours=-5))))

    flushed = _record_all(store, tmp_path, [live])
    store.insert_events([by_dict.to_row()])
    stored = [row["ts"] for row in store.fetch_events()]
    store.dispose()

    assert flushed is True
    assert stored == [datetime(2026, 12, 4, 12, 0), datetime(2026, 12, 4, 12, 0)]
