"""Run every benchmark script in this directory, one after the other, and print a summary.

Each script runs in its own process with its default options, so that one
script's memory and threads cannot affect the next. Its output is printed
as it finishes. A script exits with status 1 when it missed a target, and
with 0 when it met them all or has none. The summary lists the outcome and
the time of each script.

    python benchmarks/run_all.py [--only call_overhead alert_queries] [--skip memory]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from _common import load_average, machine_summary

HERE = Path(__file__).resolve().parent


def scripts() -> list[Path]:
    paths = HERE.glob("*.py")
    return sorted(path for path in paths if not path.name.startswith("_") and path.name != "run_all.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scripts (name without .py)")
    parser.add_argument("--skip", nargs="+", metavar="NAME", default=[], help="scripts not to run")
    args = parser.parse_args()

    selected = [path for path in scripts() if path.stem not in args.skip]
    if args.only:
        unknown = sorted(set(args.only) - {path.stem for path in selected})
        if unknown:
            names = ", ".join(path.stem for path in scripts())
            parser.error(f"unknown benchmark {', '.join(unknown)}; the scripts are: {names}")
        selected = [path for path in selected if path.stem in args.only]

    print(f"machine: {machine_summary()}; load average at start {load_average()}\n", flush=True)
    summary = []
    for path in selected:
        print(f"== {path.name}", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(path)], cwd=HERE.parent, text=True, capture_output=True)
        elapsed = time.monotonic() - started
        print(result.stdout, end="" if result.stdout.endswith("\n") else "\n")
        if result.returncode not in (0, 1):
            print(result.stderr[-4000:])
        summary.append((path.stem, result.returncode, elapsed))

    outcome = {0: "targets met", 1: "target missed"}
    print("== summary")
    for name, returncode, elapsed in summary:
        print(f"{name:<24}{outcome.get(returncode, f'failed (exit {returncode})'):<22}{elapsed:>8.0f} s")
    return 0 if all(returncode == 0 for _, returncode, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
