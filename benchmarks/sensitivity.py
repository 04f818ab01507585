"""Search at depth: the old default against role groups + a sensitivity warm start, same budget.

    python benchmarks/sensitivity.py                         # tiny 8-block BERT, 3 seeds
    python benchmarks/sensitivity.py --models tiny-bert minilm --trials 60 --seeds 0
    python benchmarks/sensitivity.py --quick --no-write      # a smoke run (< 3 minutes)

Post-training plans (no fine-tune), objective: task score (mean cosine of the sentence
embeddings to the teacher's) and real artifact bytes, constraint ``accuracy_drop <= 0.01``
(cosine >= 0.99). Methods, each with the same number of trials:

* ``old``: the previous default: one set of knobs per layer, the default warm start (uniform
  plans, ``search._searcher.default_baselines``).
* ``grouped``: the same warm start on the space grouped by role and depth
  (``spaces.group_by_role``: Q/K/V, attention output, FFN in/out per early/middle/late block,
  embeddings, position tables).
* ``new``: the grouped space, opened by the sensitivity pass's greedy plans for several byte
  budgets and the hand-style plans (``spaces.sensitivity_plans``), then the default warm start.

Each front is chosen on val; the headline member is the smallest one within 1 point of the
teacher on val (``_search_common.val_chosen``), reported with its test score. Hypervolume as in
``_search_common`` (test score x decades of compression). The sensitivity pass's time is
compared with the median trial of the same run (measured side by side).

Models: ``tiny-bert`` (a random-init 8-block, 64-wide BERT sentence encoder, 53 layers: cheap)
and ``minilm`` (the pretrained all-MiniLM-L6-v2 built-in task, when it is installed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _md import table, write_section  # noqa: E402
from _search_common import (  # noqa: E402
    ROOT,
    front_hv,
    loadavg,
    log,
    search,
    val_chosen,
)

from autocompress.spaces import (  # noqa: E402
    CompressionSpace,
    FinetuneSettings,
    Knobs,
    group_by_role,
    sensitivity,
    sensitivity_plans,
)
from autocompress.tasks import Task  # noqa: E402

RUNS = ROOT / "runs" / "bench" / "sensitivity"
METHODS = ("old", "grouped", "new")
BITS = (2, 3, 4, 5, 6, 8)
VOCAB, SEQ, HIDDEN, BLOCKS = 1000, 24, 64, 8


def _tiny_bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    class PooledBert(BertModel):
        """A BERT sentence encoder: mean of the last hidden states over the mask."""

        def forward(self, input_ids: Any, attention_mask: Any) -> torch.Tensor:  # type: ignore[override]
            h = super().forward(input_ids=input_ids, attention_mask=attention_mask)[0]
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=BLOCKS,
        num_attention_heads=4,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=SEQ,
    )
    return PooledBert(cfg, add_pooling_layer=False).eval()


def _tiny_bert_data() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for split in ("train", "val", "test"):
        n = 256
        ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(SEQ // 3, SEQ + 1, (n,), generator=g)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        out[split] = {"input_ids": ids * mask, "attention_mask": mask}
    return out


def make_task(name: str) -> Task:
    if name == "tiny-bert":
        return Task(
            name="tiny-bert-8",
            build_model=_tiny_bert,
            load_data=_tiny_bert_data,
            kind="embedding",
            teacher_model=_tiny_bert(),
            eval_batch_size=256,
        )
    from autocompress.tasks import get_task

    return get_task(name)


def knobs_of(task: Task) -> Knobs:
    """The searched knobs: bits only on the tiny BERT; on MiniLM also group-wise scales (as
    ``experiments/minilm.yaml``), since per-channel 4-bit Linear layers lose too much there."""
    if task.name == "minilm":
        return Knobs(bits=(3, 4, 5, 6, 8), sparsity=None, groups=(0, 32, 128))
    return Knobs(bits=BITS, sparsity=None)


def _median_trial(res: Any) -> float:
    d = res.trials[res.trials["status"] == "COMPLETE"]["duration_s"].astype(float)
    return float(d.median()) if len(d) else float("nan")


def run_one(task: Task, method: str, seed: int, trials: int, examples: int) -> dict[str, Any]:
    """One search of ``method``; the row of its results."""
    from autocompress.objectives import Objective
    from autocompress.search._searcher import default_baselines, warm_start_size

    model = task.teacher()
    flat = CompressionSpace.from_model(model, knobs_of(task), finetune=FinetuneSettings(epochs=0))
    space = flat if method == "old" else group_by_role(flat)
    rd = RUNS / task.name / f"{method}-s{seed}"
    plans, sens = None, None
    # the default warm start, projected onto the space as search.run does (strict=False)
    default: list[Any] = []
    for p in default_baselines(space, warm_start_size(trials), seed):
        if space.project(p) not in default:
            default.append(space.project(p))
    if method == "grouped":
        plans = default
    elif method == "new":
        objective = Objective(["accuracy", "size_bytes"], ["accuracy_drop <= 0.01"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each trial runs (cpus_per_trial=1): a fair time ratio
        try:
            sens = sensitivity(task, space, examples=examples)
        finally:
            torch.set_num_threads(threads)
        plans = sensitivity_plans(task, space, objective, n=4, sens=sens)
        plans += [p for p in default if p not in plans]
    t0 = time.perf_counter()
    res = search(task, space, rd, trials=trials, seed=seed, baselines=plans,
                 warm_start=plans is None)  # fmt: skip
    wall = time.perf_counter() - t0
    tv = float(res.teacher["val"]["accuracy"])
    tt = float(res.teacher["test"]["accuracy"])
    tbytes = float(res.teacher["size_bytes"])
    chosen = val_chosen(res.pareto, tv)
    done = res.trials[res.trials["status"] == "COMPLETE"]
    row = {
        "model": task.name,
        "method": method,
        "seed": seed,
        "knobs": len(space.free_groups()),
        "warm": len(plans) if plans is not None else warm_start_size(trials),
        "trials": len(done),
        "feasible": int(done["feasible"].astype(bool).sum()) if len(done) else 0,
        "hv": front_hv(res.pareto, tt, tbytes),
        "ratio": tbytes / float(chosen["size_bytes"]) if chosen is not None else float("nan"),
        "val": float(chosen["accuracy"]) if chosen is not None else float("nan"),
        "test": float(chosen["test_accuracy"]) if chosen is not None else float("nan"),
        "wall_s": wall + (sens.seconds if sens is not None else 0.0),
        "median_trial_s": _median_trial(res),
        "sens_s": sens.seconds if sens is not None else float("nan"),
        "sens_evals": sens.evaluations if sens is not None else 0,
        "teacher_test": tt,
    }
    log(
        f"{task.name} {method} seed {seed}: hv {row['hv']:.4f}, chosen {row['ratio']:.2f}x "
        f"val {row['val']:.4f} test {row['test']:.4f}, {row['feasible']}/{row['trials']} "
        f"feasible, {wall:.0f} s"
        + (f", sensitivity {sens.seconds:.1f} s ({sens.evaluations} evals)" if sens else "")
    )
    return row


def _fmt(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ratio = "-" if r["ratio"] != r["ratio"] else f"{r['ratio']:.2f}x"
        sens = "-"
        if r["sens_evals"]:
            sens = (
                f"{r['sens_s']:.1f} s, {r['sens_evals']} evals "
                f"({r['sens_s'] / r['median_trial_s']:.1f} trials)"
            )
        out.append(
            {
                "model": r["model"],
                "method": r["method"],
                "seed": r["seed"],
                "knob sets": r["knobs"],
                "warm start": r["warm"],
                "feasible / trials": f"{r['feasible']} / {r['trials']}",
                "hypervolume": f"{r['hv']:.4f}",
                "val-chosen size": ratio,
                "its val / test score": "-"
                if ratio == "-"
                else f"{r['val']:.4f} / {r['test']:.4f}",
                "median trial": f"{r['median_trial_s']:.1f} s",
                "sensitivity pass": sens,
                "wall": f"{r['wall_s']:.0f} s",
            }
        )
    return out


def _summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {m: [r for r in rows if r["model"] == model and r["method"] == m] for m in METHODS}
        parts = []
        for m, rs in by.items():
            if not rs:
                continue
            hv = statistics.fmean(r["hv"] for r in rs)
            ratios = [r["ratio"] for r in rs if r["ratio"] == r["ratio"]]
            best = f"{statistics.fmean(ratios):.2f}x" if ratios else "none"
            parts.append(f"{m}: hypervolume {hv:.4f}, val-chosen size {best} (mean of {len(rs)})")
        lines.append(f"- **{model}**: " + "; ".join(parts))
    return "\n".join(lines)


def _init_ray(cpus: int) -> None:
    """A private local Ray for this script (``address="local"``: never another agent's)."""
    import logging
    import os

    for k, v in {"RAY_AIR_NEW_OUTPUT": "0", "RAY_AUTH_MODE": "disabled",
                 "TUNE_GLOBAL_CHECKPOINT_S": "1", "RAY_DEDUP_LOGS": "0"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-bert"])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--examples", type=int, default=64, help="calibration examples (train)")
    ap.add_argument("--quick", action="store_true", help="12 trials, one seed")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.seeds = 12, [0]
    log(f"load average before: {loadavg()}")
    _init_ray(2)
    rows = []
    for name in args.models:
        task = make_task(name)
        for seed in args.seeds:
            for method in args.methods:
                rows.append(run_one(task, method, seed, args.trials, args.examples))
    log(f"load average after: {loadavg()}")
    body = (
        "Post-training plans (no fine-tune), no sparsity, bits "
        f"{list(BITS)} per knob set on the tiny BERT; on MiniLM bits [3, 4, 5, 6, 8] and "
        "group-wise scales [0, 32, 128], round to nearest (the knobs `experiments/minilm.yaml` "
        "had before it searched with GPTQ); objective score (mean "
        "cosine to the teacher's embeddings) vs real bytes, constraint `accuracy_drop <= 0.01`; "
        f"{args.trials} trials per search, 2 workers. `old`: one knob set per layer + the default "
        "uniform warm start; `grouped`: knob sets by role x depth (`spaces.group_by_role`) + the "
        "same warm start; `new`: grouped + the sensitivity pass's greedy plans and the hand-style "
        "plans first (`spaces.sensitivity_plans`). Val-chosen: the smallest front member within "
        "1 point of the teacher on val, with its test score. The sensitivity pass is timed "
        "against the median trial of the same run.\n\n"
        + _summary(rows)
        + "\n\n"
        + table(_fmt(rows), list(_fmt(rows)[0]))
        + f"\nLoad average during the run: {loadavg()} (2 cores).\n"
    )
    print(body)
    if not args.no_write:
        cmd = "python benchmarks/sensitivity.py " + " ".join(sys.argv[1:])
        models = "" if args.models == ["tiny-bert"] else "-" + "-".join(args.models)
        title = "Search at depth: sensitivity warm start + role groups"
        write_section(f"sensitivity{models}", f"{title} ({', '.join(args.models)})", cmd, body)


if __name__ == "__main__":
    main()
