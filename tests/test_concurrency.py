"""Several processes recording into one SQLite file while the alert watcher runs."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import threading
import time

from llmcost_mw.alerts import Watcher, builtin_rules
from llmcost_mw.store import Store

PROCESSES = 8
EVENTS_PER_PROCESS = 5000

RECORDING_PROCESS = textwrap.dedent(
    """
    import logging, sys, time
    from decimal import Decimal
    from llmcost_mw.events import CostEvent
    from llmcost_mw.recorder import Recorder
    from llmcost_mw.store import Store
    from llmcost_mw.usage import Usage

    logging.basicConfig(level=logging.WARNING)
    url, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    recorder = Recorder(Store(url))
    for seq in range(count):
        # One call in 500 costs more than the request_cost limit, and the
        # spend per user and feature crosses the hourly and daily limits.
        cost = Decimal("0.75") if seq % 500 == 0 else Decimal("0.012")
        recorder.record(
            CostEvent(
                provider="anthropic",
                model="claude-sonnet-4-5-20250929",
                usage=Usage(input_tokens=1000, output_tokens=200),
                user_id=f"user-{worker}-{seq % 10}",
                feature=f"feature-{seq % 4}",
                cost_usd=cost,
                response_id=f"msg_{worker}_{seq}",
            )
        )
        if seq % 100 == 99:
            # Spread the writes over a few seconds, so that they meet the watcher's passes.
            time.sleep(0.05)
    # The atexit hook writes what is still queued.
    """
)


class CollectingNotifier:
    def __init__(self) -> None:
        self.sent = []

    def send(self, notification) -> None:
        self.sent.append(notification)


def test_eight_processes_and_watcher(db_path, caplog):
    url = f"sqlite:///{db_path}"
    store = Store(url)
    store.ensure_schema()
    notifier = CollectingNotifier()
    watcher = Watcher(store, builtin_rules(), notifier)
    stop = threading.Event()
    passes = []
    caplog.set_level(logging.WARNING)

    def watch() -> None:
        while not stop.is_set():
            passes.append(watcher.run_once())
            stop.wait(1.0)

    watcher_thread = threading.Thread(target=watch, name="watcher")
    watcher_thread.start()
    started = time.monotonic()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", RECORDING_PROCESS, url, str(worker), str(EVENTS_PER_PROCESS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(PROCESSES)
    ]
    try:
        outputs = [child.communicate(timeout=120) for child in children]
    finally:
        for child in children:
            child.kill()
        stop.set()
        watcher_thread.join(timeout=60)
    elapsed_seconds = time.monotonic() - started
    passes.append(watcher.run_once())

    with store.read() as conn:
        rows, event_ids, ids = conn.exec_driver_sql(
            "SELECT count(*), count(DISTINCT event_id), count(DISTINCT id) FROM cost_events"
        ).one()
        per_worker = dict(
            conn.exec_driver_sql(
                "SELECT substr(user_id, 1, 6), count(*) FROM cost_events GROUP BY substr(user_id, 1, 6)"
            ).all()
        )
    store.dispose()
    problems = [record for record in caplog.records if record.levelno >= logging.WARNING]

    assert [child.returncode for child in children] == [0] * PROCESSES
    assert [err for _out, err in outputs] == [""] * PROCESSES
    assert rows == PROCESSES * EVENTS_PER_PROCESS
    assert event_ids == rows
    assert ids == rows
    assert per_worker == {f"user-{worker}": EVENTS_PER_PROCESS for worker in range(PROCESSES)}
    assert len(passes) >= 3
    assert not problems
    fired = {alert.rule for alerts in passes for alert in alerts}
    assert fired == {"user_hourly_spend", "feature_daily_spend", "request_cost"}
    assert len(notifier.sent) == sum(len(alerts) for alerts in passes)
    assert elapsed_seconds < 60
