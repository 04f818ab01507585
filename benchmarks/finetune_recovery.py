"""How much of a low-bit all-MiniLM-L6-v2 plan's loss the distillation fine-tune recovers.

The built-in ``minilm`` task (pretrained all-MiniLM-L6-v2; cosine of the compressed model's
sentence embeddings to the teacher's on 300 val / 300 test sentences). For each plan (GPTQ
rounding of every Linear, the word embedding round-to-nearest, position/type embeddings 8-bit),
side by side in one run:

* ``none``: post-training (GPTQ only, no fine-tune);
* ``old``: the fine-tune as it was (``distill="output"``: 1 - cosine on the sentence
  embedding, dropout on, cosine learning rate per epoch);
* ``new``: ``distill="hidden"`` (plus every block's hidden states against the teacher's),
  ``dropout=False``, ``warmup`` (per-step warmup + cosine over the step budget).

Both fine-tunes get the same step budget, batch size and learning rate. Each row: val and
test cosine, the artifact's real bytes and ratio to the fp32 teacher artifact, and the CPU
seconds of ``compress.apply`` (GPTQ + fine-tune, ``time.process_time``, 1 torch thread).

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/finetune_recovery.py
    HF_HUB_OFFLINE=1 python benchmarks/finetune_recovery.py --steps 4 --plans 6.6x --no-write
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _md import table, write_section  # noqa: E402

from autocompress.artifacts import export  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.spaces import CompressionSpace, Knobs, LayerPlan, Plan  # noqa: E402
from autocompress.spaces._plan import FinetuneSettings  # noqa: E402
from autocompress.tasks import Task, get_task  # noqa: E402

WORD = "embeddings.word_embeddings"
# name -> (Linear bits, Linear group, word-embedding bits, word-embedding group)
PLANS = {"6.6x": (4, 64, 4, 32), "8x": (4, 128, 3, 64)}


def plan_for(task: Task, name: str, ft: FinetuneSettings) -> Plan:
    """Linear ``b``-bit group ``g`` (GPTQ), word embedding ``eb``-bit group ``eg``, position
    and token-type embeddings 8-bit."""
    lb, lg, eb, eg = PLANS[name]
    layers = {}
    for n in CompressionSpace.from_model(task.teacher(), Knobs(sparsity=None)).layer_names:
        if n == WORD:
            layers[n] = LayerPlan(bits=eb, group=eg)
        elif "embeddings" in n:
            layers[n] = LayerPlan(bits=8)
        else:
            layers[n] = LayerPlan(bits=lb, group=lg)
    return Plan(layers=layers, finetune=ft, calibration="gptq")


def settings(mode: str, steps: int, lr: float, batch: int) -> FinetuneSettings:
    """The fine-tune of one row (``none``, ``old`` or ``new``), ``steps`` optimizer steps."""
    if mode == "none":
        return FinetuneSettings(epochs=0)
    common = {"epochs": 1000, "max_steps": steps, "lr": lr, "batch_size": batch, "patience": 1000}
    if mode == "old":
        return FinetuneSettings(**common)
    return FinetuneSettings(**common, distill="hidden", dropout=False, warmup=0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per fine-tune")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--modes", nargs="+", default=["none", "old", "new"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task("minilm")
    teacher = task.teacher()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export(teacher, Plan(), Path(tmp) / "teacher", task_spec=task.spec).size_bytes
        for name in args.plans:
            for mode in args.modes:
                ft = settings(mode, args.steps, args.lr, args.batch)
                plan = plan_for(task, name, ft)
                cpu, wall = time.process_time(), time.monotonic()
                small = apply(teacher, plan, task, seed=0)
                cpu, wall = time.process_time() - cpu, time.monotonic() - wall
                art = export(small, plan, Path(tmp) / f"{name}-{mode}", task_spec=task.spec)
                row = {
                    "plan": name,
                    "fine-tune": mode,
                    "steps": 0 if mode == "none" else args.steps,
                    "val cosine": f"{task.evaluate(small, 'val')['cosine']:.4f}",
                    "test cosine": f"{task.evaluate(small, 'test')['cosine']:.4f}",
                    "MB": f"{art.size_bytes / 1e6:.2f}",
                    "ratio": f"{fp32 / art.size_bytes:.2f}x",
                    "apply CPU s": f"{cpu:.0f}",
                    "apply wall s": f"{wall:.0f}",
                }
                rows.append(row)
                print(row, flush=True)
    cols = list(rows[0])
    body = (
        f"fp32 teacher artifact: {fp32 / 1e6:.2f} MB. Plans: "
        + "; ".join(
            f"{n} = Linear {p[0]}-bit g{p[1]} GPTQ + word embedding {p[2]}-bit g{p[3]}"
            for n, p in PLANS.items()
            if n in args.plans
        )
        + f". Fine-tunes: {args.steps} steps, batch {args.batch}, lr {args.lr:g}; `old` ="
        " output-only distillation with dropout, `new` = `distill: hidden`, `dropout: false`,"
        " `warmup: 0.1`. CPU seconds include GPTQ (1 torch thread; wall time depends on the"
        " machine's load).\n\n" + table(rows, cols)
    )
    print(body)
    if not args.no_write:
        cmd = "HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/finetune_recovery.py " + " ".join(
            sys.argv[1:]
        )
        write_section(
            "finetune-recovery", "Fine-tune recovery of low-bit MiniLM plans", cmd.strip(), body
        )


if __name__ == "__main__":
    main()
