"""Issue 16: every goal measured in one run, with PASS/FAIL per goal.

Runs the three scripts that measure the goals, one after the other, shows their full
output, then prints the goals together:

* steady-state scrape, 16 live x 10,000 series: the full /metrics >= 20x faster than
  stock (``scrape.py --case hc``), and the caches of a worker scraping it bounded (its RSS
  after 100 scrapes within 5% of after 10);
* first scrape of a freshly forked worker, K=1000 compacted: <= 2x a warm one
  (``scrape.py --case cold``);
* master blocked from forking by a compaction of K=1000 dead writers: <= 20 ms
  (``scrape.py --case block``);
* ``inc()`` / ``labels(a, b).inc()`` / ``Histogram.observe()``: <= 1.2x stock
  prometheus_client in a single process, no files (``write_path.py``);
* Flask instrumentation adds <= 5 us per request in-process, multiprocess mode
  (``http.py --wsgi-only``).

    python bench/issue16.py            # about 8 minutes on 2 shared cores
    python bench/issue16.py --quick    # fewer rounds
    python bench/issue16.py --profile  # also the profiles of our hc scrape and write rows

Exits with status 1 when a goal fails.
"""

from __future__ import annotations

import os
import sys

# See bench/scrape.py: keep bench/http.py from shadowing the standard library's http.
if os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.append(sys.path.pop(0))

import argparse
import re
import subprocess
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VERDICT = re.compile(r"^(PASS|FAIL)  \[#16\] (.*)$")


def run(argv: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """Run one script, echoing its output; its exit status and its [#16] verdicts."""
    print(f"\n$ python {' '.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    verdicts = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        match = VERDICT.match(line.rstrip("\n"))
        if match:
            verdicts.append((match[1], match[2]))
    return proc.wait(), verdicts


def checkout() -> str:
    """The commit measured, and whether the package had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "victor_mp_metrics"],
                               cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (f" + {len(dirty)} uncommitted file(s) in victor_mp_metrics/"
                               if dirty else "")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds in every script")
    parser.add_argument("--profile", action="store_true", help="print the profiles too")
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    profile = ["--profile"] if args.profile else []
    scripts = [
        ["bench/scrape.py", "--case", "issue16", *quick, *profile],
        ["bench/write_path.py", *quick, *profile],
        ["bench/http.py", "--wsgi-only", "--only", "plain", "ours", *quick],
    ]
    print(f"issue 16 goals; {checkout()}", flush=True)
    started = time.perf_counter()
    goals: list[tuple[str, str]] = []
    broken = []
    for argv in scripts:
        status, verdicts = run(argv)
        goals += verdicts
        if status != 0 and not any(v == "FAIL" for v, _ in verdicts):
            broken.append(argv[0])
    print(f"\n== Issue 16 goals ({time.perf_counter() - started:.0f} s)")
    for verdict, text in goals:
        print(f"{verdict}  {text}")
    for script in broken:
        print(f"FAIL  {script} exited with an error (see its output)")
    expected = 8  # hc, its memory, cold, block, 3 write rows, in-process overhead
    if len(goals) != expected:
        print(f"FAIL  expected {expected} goal verdicts, got {len(goals)}")
    failed = broken or len(goals) != expected or any(v == "FAIL" for v, _ in goals)
    print(f"issue 16: {sum(v == 'PASS' for v, _ in goals)} of {expected} goals met")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
