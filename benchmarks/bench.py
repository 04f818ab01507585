"""Run every benchmark script, one after another, each writing its sections of docs/benchmarks.md.

    python benchmarks/bench.py            # full (about an hour on 2 cores)
    python benchmarks/bench.py --quick    # every script in its quick mode (a few minutes each)
    python benchmarks/bench.py --only search_quality overhead

Order: CPU-heavy quality benchmarks first, timing benchmarks (latency, overhead) last, never two
at once, so the timings see the quietest machine this run can give them. A script that fails is
reported and the others still run; the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, full-mode argument lists, quick-mode argument lists); one script may run several times.
STEPS: list[tuple[str, list[list[str]], list[list[str]]]] = [
    (
        "search_quality",
        [
            ["--part", "targets", "--tasks", "digits-mlp", "--target-seeds", "0", "1", "2"],
            ["--part", "targets", "--tasks", "mnist1d-cnn", "--target-trials", "120"],
            ["--part", "compare", "--seeds", "0", "1", "2"],
        ],
        [["--quick"]],
    ),
    ("engine", [[]], [["--quick"]]),
    ("reliability", [[]], [["--quick"]]),
    ("latency", [[]], [["--quick"]]),
    ("overhead", [["--fidelity"], []], [["--fidelity", "--quick"], ["--quick"]]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every script in its quick mode")
    ap.add_argument("--only", nargs="+", default=None, help="script names to run")
    args = ap.parse_args()
    failed = []
    for name, full, quick in STEPS:
        script = HERE / f"{name}.py"
        if args.only and name not in args.only:
            continue
        if not script.is_file():
            print(f"bench: {script.name} does not exist, skipped", flush=True)
            continue
        for extra in quick if args.quick else full:
            cmd = [sys.executable, str(script), *extra]
            print(f"bench: {' '.join(cmd[1:])}", flush=True)
            t0 = time.monotonic()
            rc = subprocess.call(cmd, cwd=HERE.parent)
            print(f"bench: {name} exited {rc} after {time.monotonic() - t0:.0f}s", flush=True)
            if rc:
                failed.append(" ".join([name, *extra]))
    if failed:
        print(f"bench: failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
