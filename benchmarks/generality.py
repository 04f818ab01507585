"""Generality: every knob on real architectures as they come (no wrapper), end to end.

For each model of the zoo (tiny random-init ``transformers`` BERT, DistilBERT, GPT-2, ViT, T5,
Llama, ResNet; torch ``TransformerEncoder``, LSTM, residual and depthwise-separable CNNs), with
its natural batches: discovery (parameter coverage, skipped tensors) -> each knob family
(sparsity + bits, codebook, low rank, width) -> a 1-epoch distillation fine-tune -> export ->
load (outputs identical) -> ONNX Runtime (outputs within ``ORT_TOL``). Writes the table to
``docs/generality.md``.

    python benchmarks/generality.py            # all models, writes docs/generality.md
    python benchmarks/generality.py bert lstm  # some models, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from autocompress import CompressionSpace, Plan, Task, compress, export, load
from autocompress._zoo import CLASSES, ZOO, zoo_inputs
from autocompress.spaces._plan import FinetuneSettings, LayerPlan
from autocompress.tasks._batch import call_model, pick_output

DOC = Path(__file__).resolve().parent.parent / "docs" / "generality.md"
KNOBS = ("sparsity+bits", "codebook", "low rank", "width")
ORT_TOL = 1e-4
"""ONNX Runtime fp32 outputs must be within this of torch's, relative to the largest output."""
N_TRAIN, N_EVAL = 24, 8
FINETUNE = FinetuneSettings(epochs=1, batch_size=8, patience=1)


@dataclass
class ModelReport:
    """What happened to one model: coverage, skipped tensors and one status per knob."""

    name: str
    params: int = 0
    coverage: float = 0.0
    layers: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    knobs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    no_low_rank: dict[str, int] = field(default_factory=dict)
    """Layers not offered low rank: ``{reason: how many layers}``."""

    @property
    def ok(self) -> bool:
        return all(s.startswith(("pass", "not offered")) for s in self.knobs.values())


def make_task(name: str) -> Task:
    """A Task around the zoo model as it comes, with its natural (dict or tensor) batches."""
    z = ZOO[name]
    model = z.build()

    def split(n: int, seed: int) -> Any:
        x = zoo_inputs(name, n, seed)
        if z.kind == "embedding":
            return x
        y = torch.randint(0, CLASSES, (n,), generator=torch.Generator().manual_seed(seed + 99))
        return {**x, "labels": y} if isinstance(x, dict) else (x, y)

    kind = "embedding" if z.kind == "embedding" else "classification"
    return Task.from_module(
        model,
        split(N_TRAIN, 1),
        split(N_EVAL, 2),
        split(N_EVAL, 3),
        name=name,
        kind=kind,
        eval_batch_size=8,
    )


def coverage(model: torch.nn.Module, space: CompressionSpace) -> float:
    """Share of the model's parameters (tied tensors counted once) the space compresses."""
    cov = getattr(space, "coverage", None)
    if cov is not None:
        return float(cov() if callable(cov) else cov)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    return sum(layer.params for layer in space.layers) / max(1, total)


def plan_for(knob: str, space: CompressionSpace) -> Plan | str:
    """The plan exercising ``knob`` on every layer that offers it, or why it is not offered."""
    ft = FINETUNE
    if knob == "sparsity+bits":
        return space.uniform(sparsity=0.5, bits=4).replace(finetune=ft)
    if knob == "codebook":
        return space.uniform(sparsity=0.5, bits=4, scheme="codebook").replace(finetune=ft)
    if knob == "low rank":
        names = [layer.name for layer in space.layers if layer.factorizable]
        if not names:
            notes = sorted({layer.note for layer in space.layers if layer.note})
            return "not offered: " + ("; ".join(notes) or "no factorizable layer")
        layers = {n: LayerPlan(rank_ratio=0.5) for n in names}
        return Plan(layers=layers, finetune=ft)
    if knob == "width":
        return Plan(width=0.5, finetune=ft)
    raise ValueError(knob)


def outputs(model: torch.nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        return pick_output(call_model(model.eval(), x)).float()


def check_onnx(model: torch.nn.Module, x: Any, path: str) -> str:
    """``pass`` when ONNX Runtime reproduces torch within ``ORT_TOL``, else what went wrong."""
    from autocompress.deploy import load_onnx, to_onnx

    om = load_onnx(to_onnx(model, x, path, int8=False))
    got = om(**x) if isinstance(x, dict) else om(x)
    got = pick_output(got).float()
    want = outputs(model, x)
    err = float((got - want).abs().max()) / max(1.0, float(want.abs().max()))
    return "pass" if err <= ORT_TOL else f"fail: onnx: max error {err:.2e} > {ORT_TOL:.0e}"


def run_knob(task: Task, teacher: torch.nn.Module, plan: Plan, tmp: str) -> str:
    """One knob end to end; ``pass`` or ``fail: <stage>: <one line>``."""
    stage = "apply"
    try:
        small = compress.apply(teacher, plan, task)
        stage = "export"
        art = export(small, plan, f"{tmp}/art")
        stage = "load"
        back = load(art.path, model=task.build_model(), example_input=task.example_input())
        x = task.example_input(4)
        if not torch.equal(outputs(small, x), outputs(back, x)):
            return "fail: load: outputs differ after the round trip"
        stage = "onnx"
        status = check_onnx(back, x, f"{tmp}/model.onnx")
        structural = plan.width < 1.0 or any(lp.rank_ratio < 1.0 for lp in plan.layers.values())
        if status == "pass" and structural:
            before = sum(p.numel() for p in teacher.parameters())
            after = sum(p.numel() for p in small.parameters())
            status += f" ({before / after:.2f}x fewer params)"
        return status
    except Exception as e:  # the table records every failure with its stage
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if os.environ.get("GENERALITY_TRACEBACK"):
            traceback.print_exc()
        return f"fail: {stage}: {type(e).__name__}: {msg[:160]}"


def check_model(name: str, knobs: tuple[str, ...] = KNOBS) -> ModelReport:
    """Discovery and every knob on one zoo model."""
    start = time.perf_counter()
    torch.manual_seed(0)
    task = make_task(name)
    teacher = task.teacher()
    rep = ModelReport(name, params=sum(p.numel() for p in teacher.parameters()))
    space = CompressionSpace.from_model(teacher)
    rep.coverage, rep.layers, rep.skipped = (
        coverage(teacher, space),
        len(space.layers),
        {k: str(v) for k, v in dict(space.skipped).items()},
    )
    for layer in space.layers:
        if not layer.factorizable:
            why = layer.note or "not factorizable"
            rep.no_low_rank[why] = rep.no_low_rank.get(why, 0) + 1
    with tempfile.TemporaryDirectory() as tmp:
        for knob in knobs:
            plan = plan_for(knob, space)
            rep.knobs[knob] = plan if isinstance(plan, str) else run_knob(task, teacher, plan, tmp)
    rep.seconds = time.perf_counter() - start
    return rep


def markdown(reports: list[ModelReport], command: str) -> str:
    """The docs/generality.md page."""
    lines = [
        "# Generality: real architectures as they come",
        "",
        "Written by `benchmarks/generality.py`; do not edit by hand. Each model is built as it",
        "comes (random init from a small config, no wrapper) and fed its natural batches",
        "(`input_ids` + `attention_mask` dicts with padding, `pixel_values`, tensors). Each knob",
        "runs end to end: discovery -> compress (plan on every layer offering the knob) -> 1-epoch",
        "distillation -> export -> load (outputs identical) -> ONNX Runtime (fp32 outputs within",
        f"{ORT_TOL:.0e} of torch, relative to the largest output).",
        "",
        f"Command: `{command}`",
        "",
        "| model | params | coverage | layers | " + " | ".join(KNOBS) + " | seconds |",
        "|---|---|---|---|" + "---|" * len(KNOBS) + "---|",
    ]
    for r in reports:
        cells = [r.knobs.get(k, "-") for k in KNOBS]
        lines.append(
            f"| {r.name} | {r.params:,} | {r.coverage:.1%} | {r.layers} | "
            + " | ".join(c.replace("|", "/") for c in cells)
            + f" | {r.seconds:.1f} |"
        )
    lines += ["", "## Layers not offered low rank, with the reason", ""]
    for r in reports:
        if r.no_low_rank:
            lines.append(f"**{r.name}**")
            lines.append("")
            lines += [f"- {n} layer(s): {why}" for why, n in sorted(r.no_low_rank.items())]
            lines.append("")
    lines += ["", "## Parameters left uncompressed, with the reason", ""]
    for r in reports:
        if r.skipped:
            lines.append(f"**{r.name}**")
            lines.append("")
            lines += [f"- `{k}`: {v}" for k, v in r.skipped.items()]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", help=f"zoo models (default: all of {list(ZOO)})")
    args = ap.parse_args(argv)
    names = args.models or list(ZOO)
    torch.set_num_threads(1)
    reports = []
    for name in names:
        r = check_model(name)
        reports.append(r)
        print(
            f"{name:20s} coverage {r.coverage:6.1%}  "
            + "  ".join(f"{k}={v}" for k, v in r.knobs.items()),
            flush=True,
        )
    if not args.models:
        DOC.write_text(markdown(reports, "python benchmarks/generality.py"))
        print(f"wrote {DOC}")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
