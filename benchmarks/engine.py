"""Engine benchmark: accuracy and real artifact size of uniform plans on digits-mlp / mnist1d-cnn.

Prints a table and writes it to docs/benchmarks.md. Every ratio is real artifact bytes of the
compressed model over real artifact bytes of the fp32 teacher, both exported the same way.

    python benchmarks/engine.py            # full table (~10 minutes on 2 cores)
    python benchmarks/engine.py --quick    # a few rows
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _md import table, write_section  # noqa: E402

from autocompress.artifacts import export, inspect_artifact  # noqa: E402
from autocompress.compress import apply  # noqa: E402
from autocompress.spaces import CompressionSpace, FinetuneSettings, Plan  # noqa: E402
from autocompress.tasks import get_task  # noqa: E402

# (sparsity, bits, scheme, rank_ratio, width)
FULL = [
    (0.0, 32, "uniform", 1.0, 1.0),
    (0.0, 16, "uniform", 1.0, 1.0),
    (0.0, 8, "uniform", 1.0, 1.0),
    (0.0, 4, "uniform", 1.0, 1.0),
    (0.5, 8, "uniform", 1.0, 1.0),
    (0.8, 6, "uniform", 1.0, 1.0),
    (0.9, 4, "uniform", 1.0, 1.0),
    (0.9, 4, "codebook", 1.0, 1.0),
    (0.95, 4, "uniform", 1.0, 1.0),
    (0.9, 2, "uniform", 1.0, 1.0),
    (0.0, 8, "uniform", 0.5, 1.0),
    (0.5, 4, "uniform", 0.5, 1.0),
    (0.0, 8, "uniform", 1.0, 0.5),
    (0.5, 4, "uniform", 1.0, 0.5),
    (0.7, 4, "uniform", 1.0, 0.3),
    (0.5, 4, "codebook", 0.5, 0.5),
]
QUICK = [FULL[0], FULL[2], FULL[5], FULL[6], FULL[13]]


def encodings(path: Path) -> str:
    """Encodings the exporter picked for the weight tensors, e.g. ``relidx x2, dense x1``."""
    names = {"d": "dense", "m": "bitmask", "r": "relidx"}
    counts: dict[str, int] = {}
    for t in inspect_artifact(path)["tensors"]:
        if t["name"].endswith("weight"):
            enc = names.get(t["encoding"][0], t["encoding"])
            counts[enc] = counts.get(enc, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def bench(task_name: str, rows: list[tuple], out: Path) -> list[dict]:
    task = get_task(task_name)
    teacher = task.teacher()
    base = task.evaluate(teacher, "test")[task.metric_name]
    ref = export(teacher, Plan(), out / f"{task_name}-teacher", task_spec=task.spec).size_bytes
    space = CompressionSpace.from_model(teacher)
    results = []
    for i, (sp, bits, scheme, rank, width) in enumerate(rows):
        knobs = dict(sparsity=sp, bits=bits, scheme=scheme, rank_ratio=rank, width=width)
        plan = space.validate(space.uniform(**knobs))
        t0 = time.perf_counter()
        model = apply(teacher, plan, task)
        secs = time.perf_counter() - t0
        acc = task.evaluate(model, "test")[task.metric_name]
        art = export(model, plan, out / f"{task_name}-{i}", task_spec=task.spec)
        row = {
            "task": task_name,
            "sparsity": sp,
            "bits": bits,
            "scheme": scheme,
            "rank": rank,
            "width": width,
            "test acc": f"{acc:.4f}",
            "drop (pt)": f"{100 * (base - acc):+.2f}",
            "bytes": f"{art.size_bytes:,}",
            "ratio": f"{ref / art.size_bytes:.1f}x",
            "encodings": encodings(art.path),
            "apply s": f"{secs:.1f}",
        }
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        results.append(row)
    print(f"{task_name}: teacher test acc {base:.4f}, teacher artifact {ref:,} bytes")
    results.insert(
        0,
        {
            **{k: "-" for k in results[0]},
            "task": f"{task_name} (teacher)",
            "test acc": f"{base:.4f}",
            "bytes": f"{ref:,}",
            "ratio": "1.0x",
        },
    )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few rows only")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as d:
        res = bench("digits-mlp", rows, Path(d)) + bench("mnist1d-cnn", rows, Path(d))
    cols = list(res[-1].keys())
    body = (
        "Uniform plans (the same knobs on every layer) with the default distillation fine-tune "
        f"({FinetuneSettings().epochs} epochs max, early stopping on val). "
        "`ratio` = fp32 teacher artifact bytes / "
        "artifact bytes, both counting every file a deployment needs (weights.safetensors, "
        "plan.json, manifest.json). Accuracy is on the held-out test split. `apply s` is the "
        "wall time of compress + fine-tune (noisy: other jobs may share the cores).\n\n"
        + table(res, cols)
    )
    if not args.no_write:
        cmd = "python benchmarks/engine.py" + (" --quick" if args.quick else "")
        write_section("engine", "Engine: uniform plans", cmd, body)
    print(table(res, cols))


if __name__ == "__main__":
    main()
