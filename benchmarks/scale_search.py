"""Search at scale: a 20-trial search on a ~23M-parameter BERT with 2 workers, per-trial time split.

A random-initialized ``BertForSequenceClassification`` (6 layers, hidden 384, 12 heads,
vocabulary 30522: MiniLM-L6 size, built from a config, no download) on random token data.
Every trial's record carries ``timing`` (see ``autocompress/search/_trial.py``): seconds spent
fetching the task (``ship``: only the first trial of each worker process pays it), computing
the teacher's train outputs (``teacher``: once per worker process), compressing up to the first
fine-tune step, fine-tuning, exporting and evaluating; ``other`` is the rest of the trial's
recorded duration. ``cycle`` is the time from the previous trial's end to this trial's end on
the same worker process (everything Ray Tune and the trial function spend between two results),
for the trials after each worker's first.

    python benchmarks/scale_search.py                       # 20 trials, 2 workers, prints
    python benchmarks/scale_search.py --trials 6 --workers 1 --steps 0   # framework cost only
    python benchmarks/scale_search.py --write               # also docs/benchmarks.md section
    python benchmarks/scale_search.py --model bert-base --trials 4   # the 110M model

Peak memory per worker: a thread reads the peak resident set (``VmHWM`` in
``/proc/<pid>/status``, the number ``getrusage(RUSAGE_SELF).ru_maxrss`` gives inside the
process) of every process descending from this one while the search runs; each trial record
names its worker process (``pid``), so the table gives each worker's peak against the model's
fp32 size (4 bytes per parameter). Linux only (``/proc``); elsewhere the column says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

PARTS = ["ship_s", "teacher_outputs_s", "compress_s", "finetune_s", "export_s", "evaluate_s"]
COLUMNS = ["trial", "pid", "ship", "teacher", "compress", "fine-tune", "export", "evaluate"]
COLUMNS += ["other", "total", "cycle"]


def tokens(n: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token batches with padding and binary labels (what a tokenizer + labels give)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(seq)[None] < torch.randint(seq // 2, seq + 1, (n, 1), generator=g)).long()
    ids = torch.randint(1, vocab, (n, seq), generator=g) * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": ids[:, 0] % 2}


CONFIGS = {
    # MiniLM-L6 size (22.7M with the classifier head)
    "bert-6x384": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    "bert-base": {},  # BertConfig() defaults: 12 x 768, 109.5M
}


def build_task(train: int, seq: int, model: str = "bert-6x384"):  # noqa: ANN201
    """A random-initialized BERT classifier (``CONFIGS[model]``) as a Task; the teacher is the
    model itself (no training)."""
    from transformers import BertConfig, BertForSequenceClassification

    from autocompress import Task

    torch.manual_seed(0)
    cfg = BertConfig(**CONFIGS[model])
    net = BertForSequenceClassification(cfg).eval()
    v = cfg.vocab_size
    return Task.from_hf(
        net, tokens(train, seq, v, 0), tokens(128, seq, v, 1), tokens(128, seq, v, 2)
    )


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size of ``pid`` in bytes (``VmHWM``), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _descendants(root: int) -> set[int]:
    """Every live process whose chain of parents reaches ``root`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class PeakMemory:
    """Peak resident memory of this process's descendants (Ray's workers), sampled from /proc.

    ``VmHWM`` is the kernel's own high-water mark, so a sample taken any time before the
    process exits holds its true peak; sampling every ``every`` seconds only misses a worker
    that grows and dies between two samples. Use as a context manager; ``peak[pid]`` is bytes.
    """

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.peak: dict[int, int] = {}
        self.available = os.path.isdir("/proc/self")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def sample(self) -> None:
        for pid in _descendants(os.getpid()):
            hwm = _vm_hwm(pid)
            if hwm is not None:
                self.peak[pid] = max(self.peak.get(pid, 0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self) -> PeakMemory:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def import_baseline() -> int | None:
    """Peak resident memory of a fresh Python that only imports what a worker imports (torch,
    transformers, ray, the engine and the search): the floor under every worker's peak."""
    import subprocess

    code = (
        "import torch, transformers, ray, autocompress.compress, autocompress.search, "
        "autocompress.artifacts; print(open('/proc/self/status').read())"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    hwm = [ln for ln in out.splitlines() if ln.startswith("VmHWM:")]
    return int(hwm[0].split()[1]) * 1024 if hwm else None


def driver_peak() -> int:
    """This process's peak resident set size in bytes: ``VmHWM`` of its own address space
    (``ru_maxrss`` would carry the peak of a parent over ``exec``, e.g. benchmarks/scale.py's)."""
    hwm = _vm_hwm(os.getpid())
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trial_rows(run_dir: Path) -> list[dict]:
    """One row per trial record, in finish order, with its time split (seconds)."""
    recs = [json.loads(p.read_text()) for p in (run_dir / "records").glob("*.json")]
    recs.sort(key=lambda r: r["finished_at"])
    last: dict[object, float] = {}
    rows = []
    for r in recs:
        t = r.get("timing") or {}
        pid = r.get("pid", "?")
        parts = [float(t.get(p, 0.0)) for p in PARTS]
        total = float(r["duration_s"]) + float(t.get("ship_s", 0.0))
        cycle = r["finished_at"] - last[pid] if pid in last else None
        last[pid] = r["finished_at"]
        row = {"trial": r["trial_id"], "pid": pid, "status": r["status"], "total": total}
        row.update(dict(zip(COLUMNS[2:8], parts, strict=True)))
        row["other"] = total - sum(parts) if t else None
        row["cycle"] = cycle
        rows.append(row)
    add_split(rows)
    return rows


def fmt(x: object) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def _median(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def run_search(
    model: str = "bert-6x384",
    trials: int = 20,
    workers: int = 2,
    steps: int = 8,
    train: int = 256,
    seq: int = 32,
    run_dir: str | None = None,
    device: str = "cpu",
) -> dict:
    """One ``search.run`` on ``model`` under :class:`PeakMemory`; returns its rows, per-worker
    peak memory, the split summary and what was run (plain data, printed and tabulated)."""
    from autocompress import CompressionSpace, FinetuneSettings, Knobs, Objective, search

    task = build_task(train, seq, model)
    teacher = task.teacher()
    params = sum(p.numel() for p in teacher.parameters())
    ft = FinetuneSettings(epochs=1 if steps else 0, max_steps=steps, batch_size=16)
    space = CompressionSpace.from_model(
        teacher, Knobs(sparsity=(0.0, 0.8), bits=(4, 8)), finetune=ft
    )
    out_dir = Path(run_dir or tempfile.mkdtemp(prefix="scale_search_")) / "run"
    t0 = time.monotonic()
    with PeakMemory() as mem:
        result = search.run(
            task,
            space,
            Objective(["accuracy", "size_bytes"]),
            trials=trials,
            workers=workers,
            run_dir=out_dir,
            progress=False,
            keep_artifacts="none",
            device=device,
        )
        mem.sample()
    wall = time.monotonic() - t0
    rows = trial_rows(out_dir)
    fp32 = 4 * params
    workers_mem = []
    for pid in sorted({r["pid"] for r in rows}, key=str):
        peak = mem.peak.get(pid) if isinstance(pid, int) else None
        workers_mem.append(
            {
                "worker pid": pid,
                "trials": sum(r["pid"] == pid for r in rows),
                "peak RSS MB": fmt(peak / 1e6) if peak else "not seen",
                "peak / fp32 model": f"{peak / fp32:.1f}x" if peak else "-",
            }
        )
    drv = driver_peak()
    workers_mem.append(
        {
            "worker pid": "driver",
            "trials": 0,
            "peak RSS MB": fmt(drv / 1e6),
            "peak / fp32 model": f"{drv / fp32:.1f}x",
        }
    )
    base = import_baseline()
    if base:
        workers_mem.append(
            {
                "worker pid": "imports only (fresh Python)",
                "trials": 0,
                "peak RSS MB": fmt(base / 1e6),
                "peak / fp32 model": f"{base / fp32:.1f}x",
            }
        )
    cycles = [r["cycle"] for r in rows if r["cycle"] is not None]
    summary = {
        "model": model,
        "params": params,
        "trials": len(rows),
        "complete": sum(r["status"] == "COMPLETE" for r in rows),
        "workers": workers,
        "steps": steps,
        "device": device,
        "wall_s": wall,
        "median_total_s": _median([r["total"] for r in rows]),
        "median_cycle_s": _median(cycles),
        "ship_paid": sum(r["ship"] > 0 for r in rows),
        "processes": len({r["pid"] for r in rows}),
    }
    for c in COLUMNS[2:9] + SPLIT:
        summary[f"median_{c}_s"] = _median([r[c] for r in rows if r.get(c) is not None])
    print(result.summary().splitlines()[0])
    return {"rows": rows, "memory": workers_mem, "summary": summary, "fp32_bytes": fp32}


SPLIT = ["to first step", "fine-tune", "after fine-tune", "framework share"]
"""Trial start to the first fine-tune step (ship + teacher outputs + compress), the fine-tune,
and the end of the fine-tune to the record (export + evaluate + other), against the total."""


def add_split(rows: list[dict]) -> None:
    """Fill :data:`SPLIT` in each row (seconds, and the share of the total outside fine-tune
    and compression: shipping, teacher outputs, export, evaluation, the rest)."""
    for r in rows:
        if r["other"] is None:
            r.update(dict.fromkeys(SPLIT))
            continue
        r["to first step"] = r["ship"] + r["teacher"] + r["compress"]
        r["after fine-tune"] = r["export"] + r["evaluate"] + r["other"]
        frame = r["to first step"] - r["compress"] + r["after fine-tune"]
        r["framework share"] = frame / r["total"] if r["total"] > 0 else None


def print_run(run: dict) -> None:
    rows, summary = run["rows"], run["summary"]
    print(f"model: {summary['model']}, {summary['params'] / 1e6:.1f}M parameters")
    print(
        f"search: {len(rows)} trials, {summary['workers']} workers, {summary['wall_s']:.1f}s wall"
    )
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    for r in rows:
        print("  ".join(f"{fmt(r[c]):>10}" for c in COLUMNS))
    for m in run["memory"]:
        print(m)
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(CONFIGS), default="bert-6x384")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="fine-tune steps per trial (0: none)")
    ap.add_argument("--train", type=int, default=256, help="training examples")
    ap.add_argument("--seq", type=int, default=32, help="tokens per example")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md section")
    ap.add_argument("--json", default=None, help="also write the run's rows and memory here")
    args = ap.parse_args()
    load_avg = os.getloadavg()[0]
    run = run_search(
        args.model,
        args.trials,
        args.workers,
        args.steps,
        args.train,
        args.seq,
        args.run_dir,
        args.device,
    )
    print_run(run)
    if args.json:
        Path(args.json).write_text(json.dumps(run, default=str))
    if args.write:
        from _md import table, write_section

        s, rows = run["summary"], run["rows"]
        medians = {c: fmt(s[f"median_{c}_s"]) for c in COLUMNS[2:9]}
        medians["trial"], medians["pid"] = "**median**", ""
        medians["total"], medians["cycle"] = fmt(s["median_total_s"]), fmt(s["median_cycle_s"])
        body = (
            f"{s['params'] / 1e6:.1f}M-parameter BERT (`{args.model}`), {len(rows)} trials "
            f"({s['complete']} complete), {args.workers} workers, {args.steps} fine-tune steps "
            f"per trial, {args.train} train examples x {args.seq} tokens, "
            f"{s['wall_s']:.0f} s wall, load average {load_avg:.1f} at the start and "
            f"{os.getloadavg()[0]:.1f} at the end (2 cores shared with other jobs). The task was "
            f"fetched {s['ship_paid']} times by {s['processes']} worker processes. Seconds per "
            "trial, in finish order (`ship`: fetching the task; `teacher`: the teacher's train "
            "outputs, once per worker; `compress`: up to the first fine-tune step; `other`: the "
            "rest of the trial; `cycle`: from the previous trial's end to this one's on the same "
            "worker):\n\n"
            + table([{c: fmt(r[c]) for c in COLUMNS} for r in rows] + [medians], COLUMNS)
            + "\nPeak resident memory (`VmHWM`) of each worker process against the model's "
            f"fp32 size ({run['fp32_bytes'] / 1e6:.0f} MB):\n\n"
            + table(run["memory"], ["worker pid", "trials", "peak RSS MB", "peak / fp32 model"])
        )
        cmd = f"python benchmarks/scale_search.py --trials {args.trials} --workers {args.workers}"
        if args.model != "bert-6x384":
            cmd += f" --model {args.model}"
        write_section(
            "scale-search", "Search at scale: per-trial time split", cmd + " --write", body
        )


if __name__ == "__main__":
    main()
