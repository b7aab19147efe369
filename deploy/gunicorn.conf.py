"""Gunicorn settings for serving an instrumented app with several workers.

    gunicorn -c deploy/gunicorn.conf.py -w 4 -k uvicorn.workers.UvicornWorker \
        --bind 127.0.0.1:8000 examples.fastapi_app.app:app

Each worker counts its calls in its own files under PROMETHEUS_MULTIPROC_DIR,
and `/metrics` (from `llmcost_mw.make_metrics_asgi_app`) sums them on every
scrape. Give each gunicorn instance its own directory: starting one wipes the
prometheus_client files in it. Without the variable, a new temporary directory
is used and removed at exit.

`uvicorn.workers.UvicornWorker` still ships with uvicorn 0.55 but is
deprecated there in favour of the `uvicorn-worker` package
(`-k uvicorn_worker.UvicornWorker`), which works the same way with this file.
"""

import glob
import os
import shutil
import tempfile

TEMP_DIR_PREFIX = "llmcost-prometheus-"

# prometheus_client chooses between in-memory and file-backed values when it
# is first imported, so the variable must be set here, before the app (and with
# it prometheus_client) is imported in the master or in any worker.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=TEMP_DIR_PREFIX)

# The file names prometheus_client writes: counter_<pid>.db, gauge_livesum_<pid>.db, ...
_VALUE_FILE_PATTERNS = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


def on_starting(server):
    """Create the directory, or delete the counts a previous run left in it.

    Files left by a previous run would otherwise be added to the new totals,
    and the pids in their names may belong to new workers.
    """
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    removed = 0
    for pattern in _VALUE_FILE_PATTERNS:
        for stale in glob.glob(os.path.join(path, pattern)):
            os.remove(stale)
            removed += 1
    server.log.info("Prometheus multiprocess directory %s (removed %d old files)", path, removed)


def child_exit(server, worker):
    """Drop the live gauges of a worker that exited; its counters keep counting in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    # Only the temporary directory created above is removed, never one the user named.
    if os.path.dirname(path) == tempfile.gettempdir() and os.path.basename(path).startswith(TEMP_DIR_PREFIX):
        shutil.rmtree(path, ignore_errors=True)
