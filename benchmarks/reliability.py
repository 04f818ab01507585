"""Reliability benchmark: memory of a 50-trial digits-mlp search over time.

Runs ``autocompress run`` (2 workers, a short fine-tune) in a subprocess and samples, every
0.25 s from /proc (psutil is not needed), the resident memory (RSS) and the heap (anonymous
memory) of the driver and of every Ray worker running trials, with the number of trials
finished at that moment. Then it answers: does memory grow with the number of trials? Memory is
shown by tenth of the run; growth is the median over the last tenth (before the final
re-scoring) minus the median around the middle of the run (the first half includes warm-up:
imports, Ray start, caches filling up; ``--long 200`` shows a longer run).

    python benchmarks/reliability.py --long 200   # 50 and 200 trials, writes docs/benchmarks.md
    python benchmarks/reliability.py --trials 12 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _md import table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20
GROWTH_LIMIT_MB = 10.0
"""A trial worker whose heap gains more than this from the middle to the end of the run grows."""
DRIVER_KB_PER_TRIAL = 512.0
"""The driver keeps Ray Tune's record of every trial (measured with tracemalloc: per-metric
running statistics and cached JSON state of each Trial object); more than this per trial would
be a leak, not bookkeeping."""


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(d.name))
    return out


def _tree(pid: int) -> list[int]:
    children, out, todo = _children(), [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _mem(pid: int) -> tuple[int, int]:
    """(RSS, anonymous) bytes of ``pid``: anonymous memory is the process's own heap, without
    the shared pages it maps (Ray's object store, libraries), which RSS also counts."""
    rss = anon = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Anonymous:"):
                anon = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, anon


def _cmd(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


@dataclass
class Sample:
    t: float
    done: int
    driver: tuple[int, int]
    workers: dict[int, tuple[int, int]] = field(default_factory=dict)


def measure(trials: int = 50, workers: int = 2, epochs: int = 5, dt: float = 0.25) -> dict:
    """Run the search and return the samples and the summary numbers."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        exp = {
            "task": "digits-mlp",
            "space": {"knobs": {"sparsity": [0.5, 0.97], "bits": [2, 3, 4, 6, 8]}},
            "finetune": {"epochs": epochs, "patience": epochs},
            "search": {"trials": trials, "workers": workers, "seed": 0},
        }
        (tmp / "exp.yaml").write_text(yaml.safe_dump(exp))
        rd = tmp / "run"
        script = Path(sys.executable).with_name("autocompress")
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        args = [str(script), "run", str(tmp / "exp.yaml"), "--run-dir", str(rd)]
        t0 = time.monotonic()
        log = open(tmp / "log.txt", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        samples: list[Sample] = []
        try:
            while proc.poll() is None:
                done = len(list((rd / "records").glob("*.json")))
                tree = _tree(proc.pid)
                work = {p: _mem(p) for p in tree if _cmd(p).startswith("ray::ImplicitFunc")}
                samples.append(Sample(time.monotonic() - t0, done, _mem(proc.pid), work))
                time.sleep(dt)  # the sampling period
        finally:
            if proc.poll() is None:  # interrupted: end the driver and the Ray processes it started
                left = _tree(proc.pid)
                proc.kill()
                for pid in left:
                    if "ray" in _cmd(pid):
                        with contextlib.suppress(OSError):
                            os.kill(pid, 9)
        log.close()
        err = (tmp / "log.txt").read_text(errors="replace")
        if proc.returncode != 0:
            raise SystemExit(f"the search failed ({proc.returncode}):\n{err[-3000:]}")
        wall = time.monotonic() - t0
    return summarize(samples, trials, wall)


def _median(samples: list[Sample], lo: int, hi: int, key) -> float:
    vals = [key(s) for s in samples if lo <= s.done < hi and key(s) > 0]
    return statistics.median(vals) / MB if vals else float("nan")


KEYS = {
    "driver RSS": lambda s: s.driver[0],
    "driver heap": lambda s: s.driver[1],
    "largest worker RSS": lambda s: max((m[0] for m in s.workers.values()), default=0),
    "largest worker heap": lambda s: max((m[1] for m in s.workers.values()), default=0),
}
JUDGED = {"driver heap": "per trial", "largest worker heap": "total"}
"""Growth is judged on the processes' own (anonymous) memory, see :func:`_mem`."""


def _verdict(name: str, mb: float, kb_per_trial: float) -> str:
    if name not in JUDGED:
        return "-"
    if mb != mb:
        return "unknown (no samples)"
    if JUDGED[name] == "per trial":
        ok = kb_per_trial <= DRIVER_KB_PER_TRIAL
        return f"{'bookkeeping' if ok else 'grows'}: {kb_per_trial:+.0f} KB per trial"
    return "flat" if mb <= GROWTH_LIMIT_MB else "grows"


def summarize(samples: list[Sample], trials: int, wall: float) -> dict:
    """RSS by tenth of the run, and the growth over its second half (after warm-up)."""
    step = max(1, trials // 10)
    deciles = []
    for lo in range(0, trials, step):
        hi = lo + step if lo + step < trials else trials + 1
        row = {"trials finished": f"{lo}-{min(hi, trials + 1) - 1}"}
        row.update({f"{k} (MB)": f"{_median(samples, lo, hi, f):.0f}" for k, f in KEYS.items()})
        deciles.append(row)
    half, span = trials // 2, trials - trials // 2
    first = (half - step, half + step)
    last = (trials - step, trials)  # without the end (the front re-scored on test, the tables)
    growth = []
    for name, key in KEYS.items():
        a, b = _median(samples, *first, key), _median(samples, *last, key)
        growth.append(
            {
                "process": name,
                "growth over the second half (MB)": f"{b - a:+.1f}",
                "per trial (KB)": f"{(b - a) * 1024 / max(1, span - step):+.0f}",
                "peak (MB)": f"{max((key(s) for s in samples), default=0) / MB:.0f}",
                "verdict": _verdict(name, b - a, (b - a) * 1024 / max(1, span - step)),
            }
        )
    return {
        "deciles": deciles,
        "growth": growth,
        "samples": len(samples),
        "worker_processes": len({p for s in samples for p in s.workers}),
        "trials": trials,
        "wall_s": wall,
        "grows": any(r["verdict"].startswith(("grows", "unknown")) for r in growth),
    }


def describe(res: dict, workers: int, epochs: int) -> str:
    """Markdown: the run, memory by tenth of the run, growth in its second half, the verdict."""
    verdict = (
        "**Memory grows with the number of trials (or could not be measured).**"
        if res["grows"]
        else "**Memory per trial stays bounded**: trial workers stay flat after warm-up."
    )
    return (
        f"A {res['trials']}-trial `digits-mlp` search, {workers} workers, {epochs} fine-tune "
        f"epochs per trial, {res['wall_s']:.0f} s; memory sampled {res['samples']} times from "
        f"/proc ({res['worker_processes']} trial worker processes, reused between trials). Each "
        "row is the median over the samples taken while that many trials were finished.\n\n"
        + table(res["deciles"], list(res["deciles"][0]))
        + "\n"
        + table(res["growth"], list(res["growth"][0]))
        + f"\n{verdict} A trial worker is flat if its heap (its own anonymous memory; RSS also "
        "counts shared pages such as libraries and Ray's object store) gains at most "
        f"{GROWTH_LIMIT_MB:.0f} MB from the middle to the end of the search. The driver's heap "
        "holds Ray Tune's `Trial` object of every trial, finished ones included (autocompress "
        "drops their per-metric running statistics when they end, "
        "`search/_bookkeeping.py`; the rest is Tune's own state), so it grows by a fixed "
        f"amount per trial; more than {DRIVER_KB_PER_TRIAL:.0f} KB per trial would count as a "
        "leak.\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--long", type=int, default=0, help="also run this many trials (e.g. 200)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    a = ap.parse_args()
    res = measure(a.trials, a.workers, a.epochs)
    body = describe(res, a.workers, a.epochs)
    if a.long:
        body += "\nThe same search run longer, to see where warm-up ends:\n\n" + describe(
            measure(a.long, a.workers, a.epochs), a.workers, a.epochs
        )
    print(body)
    if not a.no_write:
        cmd = "python benchmarks/reliability.py" + (f" --long {a.long}" if a.long else "")
        write_section("reliability", "Reliability: memory over a search", cmd, body)
    if res["grows"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
