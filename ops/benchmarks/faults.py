"""The fault table of issue 8: every case of tests/faults, run for real, as one table.

    ./ops/bench faults [pytest args, e.g. -k redis]

Runs the fault suite (real worker processes, Postgres, Redis and the hostile HTTP server;
DATABASE_URL and REDIS_URL as for ./ops/test, embedded servers when unset) and prints, per
case: its outcome, articles expected and stored, duplicates (articles stored more than once,
counted in the change feed), the time to recover (worker cases: from the fault to the last
article stored; in-process cases: the slowest single hostile item, from the first request to
its recorded outcome) and the peak memory (in-process cases: tracemalloc peak of the
pipeline's Python allocations; worker cases: the highest resident set, VmHWM, of the worker
processes still alive at the end). Exits with pytest's status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    """Run the suite with a report file, then print its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.jsonl"
        env = {**os.environ, "TALKWIRE_FAULTS_REPORT": str(report),
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        status = subprocess.call([sys.executable, "-m", "pytest", "tests/faults", "-q",
                                  "-p", "no:cacheprovider", *sys.argv[1:]], cwd=REPO, env=env)
        rows = [json.loads(line) for line in report.read_text().splitlines()] \
            if report.exists() else []
    table = Table(title="talkwire fault suite (issue 8)")
    for name in ("case", "outcome", "articles expected", "articles stored", "duplicates",
                 "time to recover s", "peak memory MB"):
        table.add_column(name, justify="left" if name in ("case", "outcome") else "right")
    for r in sorted(rows, key=lambda r: (int(r["case"].split()[0].rstrip("ab")), r["case"])):
        table.add_row(r["case"], r["outcome"], str(r["expected"]), str(r["stored"]),
                      str(r["duplicates"]), f"{r['recover_s']:.2f}", f"{r['peak_mb']:.1f}")
    Console(width=200).print(table)
    if status:
        print(f"pytest exited {status}: see its output above", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
