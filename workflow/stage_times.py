"""Pass `dvc repro` / `dvc exp run` output through and time each stage it runs.

    dvc repro 2>&1 | python workflow/stage_times.py --out stage-times.json

A stage runs from its "Running stage 'NAME':" line to the next stage's line (or the end),
so each figure includes the stage's start-up and DVC's own work for it. The JSON maps
stage name -> seconds; `--summary` prints the per-kind totals (probe@slf and probe@alf
are both "probe") as one line, the form `make demo` ends with.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

RUNNING = re.compile(r"Running stage '([^']+)'")


def kind(stage: str) -> str:
    """probe@slf -> probe; evaluate_corruptions@aff -> evaluate_corruptions."""
    return stage.split("@", 1)[0]


def summary(times: dict[str, float]) -> str:
    totals: dict[str, float] = {}
    for stage, seconds in times.items():
        totals[kind(stage)] = totals.get(kind(stage), 0.0) + seconds
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(totals.items(), key=lambda t: -t[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file: stage -> seconds")
    args = parser.parse_args()
    times: dict[str, float] = {}
    current, since = None, time.monotonic()
    for line in sys.stdin:
        sys.stdout.write(line)
        sys.stdout.flush()
        match = RUNNING.search(line)
        if match:
            now = time.monotonic()
            if current is not None:
                times[current] = now - since
            current, since = match.group(1), now
    if current is not None:
        times[current] = time.monotonic() - since
    Path(args.out).write_text(json.dumps(times, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
