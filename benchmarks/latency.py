"""Latency benchmark: measured speedups of the deployment form (ONNX Runtime, 1 thread).

Three questions, each answered by interleaved measurements in one process (round robin, warm-up,
median of repeats; spread = interquartile range of the per-round values):

1. Width 0.5 vs the teacher on digits-cnn and mnist1d-cnn, batch 1 and 256.
2. The teacher's deployment form (ONNX Runtime) vs eager PyTorch, batch 1 and 256.
3. int8 vs fp32 in ONNX Runtime on Linear-heavy models (digits-mlp, a wide MLP).

    python benchmarks/latency.py            # ~30 s on 2 cores (idle machine)
    python benchmarks/latency.py --quick    # fewer repeats, no fine-tune
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime  # noqa: E402
import torch  # noqa: E402
from _md import table, write_section  # noqa: E402
from torch import nn  # noqa: E402

from autocompress.compress import apply  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, no fine-tune")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.manual_seed(0)
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
