"""Values that a client controls never stop recording, on SQLite or PostgreSQL."""

from __future__ import annotations

from llmcost_mw.events import CostEvent
from llmcost_mw.recorder import Recorder
from llmcost_mw.store import Store
from llmcost_mw.usage import Usage


def _event(**fields) -> CostEvent:
    return CostEvent(provider="anthropic", model="claude-sonnet-4-6", usage=Usage(input_tokens=10), **fields)


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
