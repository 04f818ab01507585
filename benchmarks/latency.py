"""Latency benchmark: measured speedups of the deployment form (ONNX Runtime, 1 thread).

Four questions, each answered by interleaved measurements in one process (round robin, warm-up,
median of repeats; spread = interquartile range of the per-round values):

1. Width 0.5 vs the teacher on digits-cnn and mnist1d-cnn, batch 1 and 256.
2. The teacher's deployment form (ONNX Runtime) vs eager PyTorch, batch 1 and 256.
3. int8 vs fp32 in ONNX Runtime on Linear-heavy models (digits-mlp, a wide MLP).
4. A search (``experiments/mnist1d_latency.yaml``: accuracy vs measured latency at batch 256,
   as ``speedup`` over the teacher; ``accuracy_drop <= 0.01``) on mnist1d-cnn, through the
   Python API: the fastest front member within one point of the teacher's **val** accuracy
   (chosen on val only), re-measured against the teacher and reported with its test accuracy.

    python benchmarks/latency.py                 # all four, ~12 min on 2 cores
    python benchmarks/latency.py --skip-search   # 1-3 only, ~30 s
    python benchmarks/latency.py --search        # 4 only
    python benchmarks/latency.py --quick         # 1-3, fewer repeats, no fine-tune
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from _md import table, write_section  # noqa: E402
from torch import nn  # noqa: E402

from autocompress import SearchResult, search  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.config import build, load_experiment  # noqa: E402
from autocompress.deploy import (  # noqa: E402
    OnnxModel,
    deploy_forms,
    latency_and_speedup,
    macs,
    measure_latency,
    paired_ratio,
    teacher_onnx,
    tile_batch,
)
from autocompress.spaces import Plan  # noqa: E402
from autocompress.spaces._plan import FinetuneSettings  # noqa: E402
from autocompress.tasks import get_task  # noqa: E402

BATCHES = (1, 256)
ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "experiments" / "mnist1d_latency.yaml"


def ms(median: float, iqr: float) -> str:
    """``median ± iqr/2`` in milliseconds, 3 significant digits."""
    return f"{median:.3g} ± {iqr / 2:.2g}"


def ratio(median: float, iqr: float) -> str:
    return f"{median:.2f}x ± {iqr / 2:.2f}"


def width_speedups(settings: dict, epochs: int) -> list[dict]:
    """Question 1: width 0.5 student vs teacher, deployment form, 1 thread."""
    rows = []
    for name in ("digits-cnn", "mnist1d-cnn"):
        task = get_task(name)
        teacher = task.teacher()
        plan = Plan(layers={}, width=0.5, finetune=FinetuneSettings(epochs=epochs))
        student = apply(teacher, plan, task)
        x1 = task.example_input(1)
        mac_ratio = macs(teacher, x1) / macs(student, x1)
        acc_t = task.evaluate(teacher, "test")["accuracy"]
        acc_s = task.evaluate(student, "test")["accuracy"]
        t0 = time.perf_counter()
        r = latency_and_speedup(student, teacher, task.example_input(64), BATCHES, **settings)
        secs = time.perf_counter() - t0
        for b in BATCHES:
            rows.append(
                {
                    "task": name,
                    "batch": b,
                    "teacher ms": ms(
                        r[f"teacher_latency_ms@{b}"], r[f"teacher_latency_iqr_ms@{b}"]
                    ),
                    "width 0.5 ms": ms(r[f"latency_ms@{b}"], r[f"latency_iqr_ms@{b}"]),
                    "speedup": ratio(r[f"speedup@{b}"], r[f"speedup_iqr@{b}"]),
                    "CV teacher / student": (
                        f"{r[f'teacher_latency_cv@{b}']:.2f} / {r[f'latency_cv@{b}']:.2f}"
                    ),
                    "MACs ratio": f"{mac_ratio:.2f}x",
                    "test acc teacher / student": f"{acc_t:.3f} / {acc_s:.3f}",
                    "measure s": f"{secs:.1f}",
                }
            )
            print(rows[-1], flush=True)
    return rows


def runtime_comparison(settings: dict) -> list[dict]:
    """Question 2: the teacher in ONNX Runtime vs eager PyTorch, same process, interleaved."""
    rows = []
    for name in ("digits-mlp", "mnist1d-cnn"):
        task = get_task(name)
        teacher = task.teacher().eval()
        om = teacher_onnx(teacher, task.example_input(), threads=1)
        for b in BATCHES:
            x = tile_batch(task.example_input(64), b).numpy()
            with torch.inference_mode():
                cands = {
                    "torch": lambda a, m=teacher: m(torch.from_numpy(a)),
                    "onnxruntime": om.run_numpy,
                }
                s = measure_latency(cands, x, **settings)
            speed, spread = paired_ratio(s["torch"], s["onnxruntime"])
            rows.append(
                {
                    "task": name,
                    "batch": b,
                    "eager torch ms": ms(s["torch"].median_ms, s["torch"].iqr_ms),
                    "onnxruntime ms": ms(s["onnxruntime"].median_ms, s["onnxruntime"].iqr_ms),
                    "ORT speedup": ratio(speed, spread),
                    "CV torch / ORT": f"{s['torch'].cv:.2f} / {s['onnxruntime'].cv:.2f}",
                }
            )
            print(rows[-1], flush=True)
    return rows


class WideMLP(nn.Module):
    """A Linear-heavy model where int8 matrix products dominate: 256-1024-1024-10."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (
            nn.Linear(256, 1024),
            nn.Linear(1024, 1024),
            nn.Linear(1024, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def int8_vs_fp32(settings: dict, epochs: int) -> list[dict]:
    """Question 3: the int8 and fp32 forms of the same 8-bit model, interleaved."""
    task = get_task("digits-mlp")
    plan = Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=FinetuneSettings(epochs=epochs))
    cases = [("digits-mlp (64-300-100-10)", apply(task.teacher(), plan, task), task)]
    torch.manual_seed(0)
    wide = apply(WideMLP(), Plan.uniform(["fc1", "fc2", "fc3"], bits=8, finetune=plan.finetune))
    cases.append(("wide MLP (256-1024-1024-10)", wide, None))
    rows = []
    for label, model, t in cases:
        example = t.example_input(64) if t is not None else torch.randn(64, 256)
        forms = {k: OnnxModel(v) for k, v in deploy_forms(model, example).items()}
        if t is not None:
            xv = t.data("val").tensors[0]
            fp, q = forms["fp32"](xv), forms["int8"](xv)
            agree = f"{float((fp.argmax(1) == q.argmax(1)).float().mean()):.4f}"
        else:
            xr = torch.randn(2000, 256)
            fp, q = forms["fp32"](xr), forms["int8"](xr)
            agree = f"{float((fp.argmax(1) == q.argmax(1)).float().mean()):.4f} (random inputs)"
        for b in BATCHES:
            x = tile_batch(example, b).numpy()
            s = measure_latency({k: f.run_numpy for k, f in forms.items()}, x, **settings)
            speed, spread = paired_ratio(s["fp32"], s["int8"])
            rows.append(
                {
                    "model (all layers 8-bit)": label,
                    "batch": b,
                    "fp32 ms": ms(s["fp32"].median_ms, s["fp32"].iqr_ms),
                    "int8 ms": ms(s["int8"].median_ms, s["int8"].iqr_ms),
                    "int8 speedup": ratio(speed, spread),
                    "CV fp32 / int8": f"{s['fp32'].cv:.2f} / {s['int8'].cv:.2f}",
                    "top-1 agreement": agree,
                }
            )
            print(rows[-1], flush=True)
    return rows


def metric_cost(settings: dict) -> str:
    """Wall time of one default ``latency_and_speedup`` call (what a search trial pays)."""
    task = get_task("digits-mlp")
    plan = Plan.uniform(
        ["fc1", "fc2", "fc3"], sparsity=0.5, bits=8, finetune=FinetuneSettings(epochs=0)
    )
    student = apply(task.teacher(), plan, task)
    teacher_onnx(task.teacher(), task.example_input(64))  # as in a search: exported once
    t0 = time.perf_counter()
    r = latency_and_speedup(student, task.teacher(), task.example_input(64))
    secs = time.perf_counter() - t0
    line = (
        f"One default `latency_and_speedup` call (digits-mlp, 50% sparse 8-bit student, batch 1 "
        f"and 256, 25 repeats, teacher export cached) took {secs:.2f} s; it chose "
        f"{'int8' if r['int8@256'] else 'fp32'} at batch 256 (speedup {r['speedup@256']:.2f}x) and "
        f"{'int8' if r['int8@1'] else 'fp32'} at batch 1 (speedup {r['speedup@1']:.2f}x)."
    )
    print(line)
    return line


def load_average() -> float:
    """The 1-minute load average (how busy the shared machine was), 0.0 where unknown."""
    path = Path("/proc/loadavg")
    return float(path.read_text().split()[0]) if path.exists() else 0.0


def _knobs(row) -> str:
    """A short description of a front member's plan: width, ranks, bits, sparsity."""
    plan = json.loads(row["plan_json"])
    layers = plan.get("layers", {})
    bits = sorted({lp.get("bits", 32) for lp in layers.values()})
    ranks = [f"{n}:{lp['rank_ratio']:g}" for n, lp in layers.items() if lp.get("rank_ratio", 1) < 1]
    sparse = max((lp.get("sparsity", 0.0) for lp in layers.values()), default=0.0)
    return (
        f"width {plan.get('width', 1.0):g}; bits {'/'.join(map(str, bits))}; "
        f"max sparsity {sparse:g}; rank {', '.join(ranks) or '-'}"
    )


def _search_result(trials: int | None, run_dir: str, reuse: bool):
    """Run the search of ``experiments/mnist1d_latency.yaml`` (or reopen a finished one)."""
    exp = load_experiment(EXPERIMENT)
    task, space, objective = build(exp, str(EXPERIMENT))
    side = Path(run_dir) / "bench_load.json"  # the load during the search, for --reuse
    if reuse and (Path(run_dir) / "result.json").is_file():
        loads = json.loads(side.read_text()) if side.is_file() else {}
        return task, exp, SearchResult.load(run_dir), loads.get("load", "not recorded")
    load_before = load_average()
    result = search.run(
        task,
        space,
        objective,
        trials=trials or exp.search.trials,
        workers=exp.search.workers,
        seed=exp.search.seed,
        run_dir=run_dir,
    )
    load = f"{load_before:.1f} before, {load_average():.1f} after"
    side.write_text(json.dumps({"load": load}))
    return task, exp, result, load


TARGET_SPEEDUP = 3.0  # issue 5: >= 3x faster than the teacher at batch 256, within 1 pt on test
MAX_DROP = 0.01


def val_fastest(front, teacher_val_acc: float, max_drop: float = MAX_DROP):
    """The headline member, chosen on val only: among front members whose val accuracy is at
    most ``max_drop`` below the teacher's, the one with the highest in-search ``speedup`` (what
    the search recorded; no test score and no later timing is read). ``None`` if none qualifies.

    Example:
        >>> import pandas as pd
        >>> f = pd.DataFrame({"trial_id": ["a", "b"], "accuracy": [0.95, 0.97],
        ...                   "speedup": [5.0, 3.0], "test_accuracy": [0.99, 0.90]})
        >>> val_fastest(f, 0.975)["trial_id"]  # "a" is 2.5 points below the teacher on val
        'b'
    """
    ok = front[front["accuracy"].astype(float) >= teacher_val_acc - max_drop - 1e-9]
    if "feasible" in ok:
        ok = ok[ok["feasible"].astype(bool)]
    if ok.empty:
        return None
    return ok.sort_values("speedup", ascending=False, kind="stable").iloc[0]


def latency_search(trials: int | None, run_dir: str, reuse: bool = False) -> str:
    """Question 4: search accuracy vs latency (batch 256). The headline member is chosen on val
    only: the front member with the highest in-search speedup among those within one point of
    the teacher's val accuracy. It is then measured once more, independently (300 rounds, both
    batch sizes and runtimes): that last number is the headline, free of selection bias, reported
    with the member's test accuracy; the target (3x, within 1 point on test) is judged on it."""
    task, exp, result, search_load = _search_result(trials, run_dir, reuse)
    wall = float(result.info.get("wall_time_s", float("nan")))
    settings = result.info.get("settings", {})
    workers = settings.get("workers", exp.search.workers)
    n_trials = len(result.trials)
    t_acc = float(result.teacher["test"]["accuracy"])
    v_acc = float(result.teacher["val"]["accuracy"])
    n_val, n_test = len(task.data("val")), len(task.data("test"))
    front = result.pareto.copy()
    if front.empty:
        raise SystemExit(f"latency search: empty front: {result.message}")
    front["test_drop"] = t_acc - front["test_accuracy"]
    front["val_drop"] = v_acc - front["accuracy"]
    best = val_fastest(front, v_acc)
    if best is None:
        raise SystemExit("latency search: no front member within 1 point of the teacher on val")
    tid = str(best["trial_id"])
    teacher, x = task.teacher(), task.example_input(64)
    teacher_macs = macs(teacher, task.example_input(1))
    load_measure = load_average()
    screen = {}
    for t in front["trial_id"]:  # for reference only: not used to choose
        r = latency_and_speedup(
            result.load_model(t), teacher, x, (256,), warmup=5, repeats=150, threads=1
        )
        screen[t] = (r["speedup@256"], r["speedup_iqr@256"])
    model = result.load_model(tid)
    load_final = load_average()
    final = {
        rt: latency_and_speedup(
            model, teacher, x, BATCHES, runtime=rt, warmup=5, repeats=300, threads=1
        )
        for rt in ("onnxruntime", "torch")
    }
    rows = []
    for _, r in front.sort_values("speedup", ascending=False).iterrows():
        tid_r = r["trial_id"]
        rows.append(
            {
                "chosen on val": "yes" if str(tid_r) == tid else "",
                "trial": tid_r,
                "plan": _knobs(r),
                "val acc": f"{r['accuracy']:.3f}",
                "val drop (pt)": f"{100 * r['val_drop']:+.1f}",
                "test acc": f"{r['test_accuracy']:.3f}",
                "test drop (pt)": f"{100 * r['test_drop']:+.1f}",
                "bytes": f"{int(r['size_bytes']):,}",
                "MACs ratio": f"{teacher_macs / macs(result.load_model(tid_r), x[:1]):.2f}x",
                "speedup (in trial)": ratio(r["speedup"], r["speedup_iqr"]),
                "speedup (test re-score)": ratio(r["test_speedup"], r["test_speedup_iqr"]),
                "speedup (150 rounds)": ratio(*screen[tid_r]),
            }
        )
    re_rows = []
    labels = {"onnxruntime": "ONNX Runtime (deployment form)", "torch": "eager PyTorch"}
    for rt, r in final.items():
        for b in BATCHES:
            form = "" if f"int8@{b}" not in r else (" int8" if r[f"int8@{b}"] else " fp32")
            re_rows.append(
                {
                    "runtime": labels[rt] + form,
                    "batch": b,
                    "teacher ms": ms(
                        r[f"teacher_latency_ms@{b}"], r[f"teacher_latency_iqr_ms@{b}"]
                    ),
                    f"trial {tid} ms": ms(r[f"latency_ms@{b}"], r[f"latency_iqr_ms@{b}"]),
                    "speedup": ratio(r[f"speedup@{b}"], r[f"speedup_iqr@{b}"]),
                    "CV teacher / model": (
                        f"{r[f'teacher_latency_cv@{b}']:.2f} / {r[f'latency_cv@{b}']:.2f}"
                    ),
                }
            )
    head = final["onnxruntime"]["speedup@256"]
    drop = float(best["test_drop"])
    why = []
    if head < TARGET_SPEEDUP:
        why.append(f"{head:.2f}x < {TARGET_SPEEDUP:g}x")
    if drop > MAX_DROP + 1e-9:
        why.append(f"test drop {100 * drop:.1f} pt > {100 * MAX_DROP:.0f}")
    verdict = "met" if not why else f"missed ({'; '.join(why)})"
    n_test_ok = int((front["test_drop"] <= MAX_DROP + 1e-9).sum())
    print(
        f"latency search: trial {tid} speedup {head:.2f}x at batch 256, test drop "
        f"{100 * drop:+.1f} pt: target {verdict}",
        flush=True,
    )
    counts = result.info.get("counts", {})
    return "\n".join(
        [
            f"`search.run` on `{EXPERIMENT.relative_to(ROOT)}` (mnist1d-cnn; objectives accuracy "
            "and latency as `speedup` = teacher latency / latency, ONNX Runtime, batch 256, 1 "
            "thread, timed interleaved with the dense teacher in the same worker; "
            f"`accuracy_drop <= {MAX_DROP}` on the {n_val:,}-example val split): {n_trials} "
            f"trials, {workers} workers, {counts} in {wall / 60:.1f} min (1-minute load average "
            f"during the search: {search_load}; {os.cpu_count()} cores). Teacher val accuracy "
            f"{v_acc:.3f}, test accuracy {t_acc:.3f} ({n_test:,} test examples); "
            f"{len(front)} front members.",
            "",
            "**The headline member is chosen on val only**: the front member with the highest "
            f"in-search speedup among those within {100 * MAX_DROP:.0f} point of the teacher's "
            "val accuracy (what a user reading `pareto.csv` would pick, without looking at "
            "test). Its speedup is then measured again, independently (below), and its test "
            f"accuracy is reported as it is. Target (issue 5): at least {TARGET_SPEEDUP:g}x "
            "faster than the teacher at batch 256 in the same runtime, within 1 point of its test "
            "accuracy.",
            "",
            f"**Chosen on val: trial {tid}, {head:.2f}x faster than the teacher at batch 256 in "
            f"ONNX Runtime, test accuracy {best['test_accuracy']:.3f} vs {t_acc:.3f} (test drop "
            f"{100 * drop:+.1f} pt). Target {TARGET_SPEEDUP:g}x within 1 point on test: "
            f"{verdict}.**"
            + (
                f" (Measured at a 1-minute load average of {load_final:.1f}: see below.)"
                if load_final > 2
                else ""
            )
            + f" ({_knobs(best)}; {int(best['size_bytes']):,} bytes.) For reference "
            f"only (this looks at test): {n_test_ok} of the {len(front)} front members are "
            "within 1 point of the teacher on test.",
            "",
            "### The front",
            "",
            "`MACs ratio`: teacher MACs / member MACs per example (analytic). "
            "Speedups are medians of per-round teacher/model ratios (± half their IQR): "
            "`in trial` was measured inside the search (25 rounds, while the other worker was "
            "fine-tuning) and is what the choice uses, `test re-score` when the front was "
            "re-scored from the reloaded artifacts after the search (25 rounds), `150 rounds` by "
            "this script afterwards for every member, for reference only (not used to choose; "
            f"1-minute load average {load_measure:.1f} at that point).",
            "",
            table(rows, list(rows[0])),
            f"### Trial {tid} measured again, independently (300 interleaved rounds)",
            "",
            "A fresh measurement of the chosen member (model reloaded from its artifact), so the "
            "headline is not the maximum of noisy numbers "
            f"(1-minute load average {load_final:.1f} on {os.cpu_count()} cores; above ~2, other "
            "jobs preempt the longer teacher calls more often and speedups read high, see "
            "docs/objectives.md)."
            + (
                f" **This measurement ran at a load of {load_final:.1f}: its speedups likely read "
                "high; re-measure on an idle machine (`--reuse`) before quoting them.**"
                if load_final > 2
                else ""
            ),
            "",
            table(re_rows, list(re_rows[0])),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no fine-tune, no search")
    ap.add_argument("--search", action="store_true", help="run only the latency search (part 4)")
    ap.add_argument("--skip-search", action="store_true", help="parts 1-3 only")
    ap.add_argument("--trials", type=int, default=None, help="search trials (default: the YAML)")
    ap.add_argument("--run-dir", default="runs/bench_latency_search", help="search run directory")
    ap.add_argument(
        "--reuse", action="store_true", help="report the finished search in --run-dir again"
    )
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.search or not (args.quick or args.skip_search):
        body = latency_search(args.trials, args.run_dir, args.reuse)
        if not args.no_write:
            cmd = "python benchmarks/latency.py --search" + (
                f" --trials {args.trials}" if args.trials else ""
            )
            cmd += " (measurements repeated on the same run with --reuse)" if args.reuse else ""
            write_section("latency-search", "Latency: search on mnist1d-cnn", cmd, body)
        print(body)
        if args.search:
            return
    torch.set_num_threads(1)  # measurements are single-threaded; so is the fine-tune here
    repeats, epochs = (10, 0) if args.quick else (150, 3)
    load_before = load_average()
    settings = {"warmup": 5, "repeats": repeats, "threads": 1}
    q1 = width_speedups(settings, epochs)
    q2 = runtime_comparison(settings)
    q3 = int8_vs_fp32(settings, epochs)
    cost = metric_cost({})
    load_after = load_average()
    busy = (
        "other processes competed for the CPU (CVs above ~0.1 show it); paired per-round ratios "
        "are the robust numbers."
        if max(load_before, load_after) > 1.0
        else "the machine was otherwise idle."
    )
    body = "\n".join(
        [
            f"All latencies are per call, ONNX Runtime {onnxruntime.__version__} "
            "(CPUExecutionProvider) or eager torch, "
            "1 intra-op thread, measured interleaved (round robin) in one process after warm-up: "
            f"median of {repeats} rounds ± half the interquartile range; speedups are the median "
            "of per-round ratios (± half their IQR); CV = standard deviation / mean over rounds. "
            f"1-minute load average {load_before:.2f} at the start, {load_after:.2f} at the end "
            f"(2 cores): {busy}",
            "",
            "### Width 0.5 vs the teacher (deployment form: ONNX Runtime fp32)",
            "",
            "`apply(teacher, Plan(layers={}, width=0.5, finetune=FinetuneSettings(epochs="
            f"{epochs})), task)`: every hidden channel group halved (real smaller layers).",
            "",
            table(q1, list(q1[0])),
            "### The teacher in ONNX Runtime vs eager PyTorch",
            "",
            table(q2, list(q2[0])),
            "### int8 vs fp32 in ONNX Runtime",
            "",
            "Dynamic quantization of the 8-bit Linear layers (exact per-channel int8 codes, uint8 "
            "activations quantized at run time); agreement = top-1 agreement of the two forms "
            "(digits-mlp: on the val split).",
            "",
            table(q3, list(q3[0])),
            "### Cost of the metric",
            "",
            cost,
        ]
    )
    if not args.no_write:
        cmd = "python benchmarks/latency.py" + (" --quick" if args.quick else "")
        write_section("latency", "Latency: deployment form and speedups", cmd, body)
    print(body)


if __name__ == "__main__":
    main()
