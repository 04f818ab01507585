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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
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


def build_task(train: int, seq: int):
    """The ~23M-parameter BERT classifier as a Task (teacher = the random-initialized model)."""
    from transformers import BertConfig, BertForSequenceClassification

    from autocompress import Task

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )
    model = BertForSequenceClassification(cfg).eval()
    v = cfg.vocab_size
    return Task.from_hf(
        model, tokens(train, seq, v, 0), tokens(128, seq, v, 1), tokens(128, seq, v, 2)
    )


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
    return rows


def fmt(x: object) -> str:
    return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="fine-tune steps per trial (0: none)")
    ap.add_argument("--train", type=int, default=256, help="training examples")
    ap.add_argument("--seq", type=int, default=32, help="tokens per example")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md section")
    args = ap.parse_args()

    from autocompress import CompressionSpace, FinetuneSettings, Knobs, Objective, search

    task = build_task(args.train, args.seq)
    model = task.teacher()
    params = sum(p.numel() for p in model.parameters())
    ft = FinetuneSettings(epochs=1 if args.steps else 0, max_steps=args.steps, batch_size=16)
    space = CompressionSpace.from_model(model, Knobs(sparsity=(0.0, 0.8), bits=(4, 8)), finetune=ft)
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="scale_search_")) / "run"
    t0 = time.monotonic()
    result = search.run(
        task,
        space,
        Objective(["accuracy", "size_bytes"]),
        trials=args.trials,
        workers=args.workers,
        run_dir=run_dir,
        progress=False,
        keep_artifacts="none",
    )
    wall = time.monotonic() - t0
    rows = trial_rows(run_dir)
    print(f"model: {params / 1e6:.1f}M parameters, {args.train} train x {args.seq} tokens")
    print(f"search: {len(rows)} trials, {args.workers} workers, {wall:.1f}s wall")
    print("  ".join(f"{c:>10}" for c in COLUMNS))
    for r in rows:
        print("  ".join(f"{fmt(r[c]):>10}" for c in COLUMNS))
    cycles = [r["cycle"] for r in rows if r["cycle"] is not None]
    summary = {
        "trials": len(rows),
        "complete": sum(r["status"] == "COMPLETE" for r in rows),
        "wall_s": wall,
        "median_total_s": statistics.median(r["total"] for r in rows) if rows else None,
        "median_cycle_s": statistics.median(cycles) if cycles else None,
        "ship_paid": sum(r["ship"] > 0 for r in rows),
        "processes": len({r["pid"] for r in rows}),
    }
    for c in COLUMNS[2:9]:
        vals = [r[c] for r in rows if r[c] is not None]
        summary[f"median_{c}_s"] = statistics.median(vals) if vals else None
    print(json.dumps(summary, indent=1))
    print(result.summary().splitlines()[0])
    if args.write:
        from _md import table, write_section

        body = (
            f"{params / 1e6:.1f}M-parameter BERT, {len(rows)} trials, {args.workers} workers, "
            f"{args.steps} fine-tune steps per trial, {wall:.0f} s wall; seconds per trial:\n\n"
            + table([{c: fmt(r[c]) for c in COLUMNS} for r in rows], COLUMNS)
        )
        cmd = f"python benchmarks/scale_search.py --trials {args.trials} --workers {args.workers}"
        write_section("scale-search", "Search at scale: per-trial time split", cmd, body)


if __name__ == "__main__":
    main()
