"""``apply``: the whole engine, structure -> factorize -> prune -> quantize -> distill."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from autocompress.compress._finetune import distill, hidden_blocks, soft_targets, streamed_train
from autocompress.compress._gptq import calibrate, calibration_inputs
from autocompress.compress._lowrank import factorize
from autocompress.compress._meta import set_quant_records
from autocompress.compress._quant import (
    attach,
    bake,
    convert_codebooks,
    has_pending_codebooks,
    set_sparsity,
)
from autocompress.compress._tiers import COUNT_SAMPLES, split_tables, tiered_layers, unsplittable
from autocompress.compress._tiers import row_counts as count_rows
from autocompress.compress._width import shrink_width
from autocompress.errors import PlanError
from autocompress.spaces._discover import discover_layers
from autocompress.spaces._plan import FinetuneSettings, Plan
from autocompress.tasks._base import Task
from autocompress.tasks._batch import Inputs


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise :class:`PlanError` (one line) if ``plan`` does not fit ``model``'s layers."""
    layers = {n: info for info in discover_layers(model)[0] for n in (info.name, *info.aliases)}
    for name, lp in plan.layers.items():
        if name not in layers:
            import difflib

            close = difflib.get_close_matches(name, list(layers), n=3)
            hint = f"did you mean {close}?" if close else f"valid layers: {list(layers)[:8]}"
            raise PlanError(f"plan names unknown layer {name!r}: {hint}")
        if lp.rank_ratio < 1.0 and not layers[name].factorizable:
            raise PlanError(
                f"layer {name!r} cannot be factorized ({layers[name].note}): use rank_ratio 1.0"
            )
        if lp.hot_rows > 0:
            from autocompress.spaces._knobs import KNOBS

            why = KNOBS["hot_rows"].offered(layers[name])
            if why is None:
                why = unsplittable(model.get_submodule(layers[name].name))
            if why is not None:
                raise PlanError(f"layer {name!r} cannot use hot_rows ({why}): use hot_rows=0")


def restructure(
    model: nn.Module,
    plan: Plan,
    example_input: Inputs,
    row_counts: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A copy of ``model`` with the plan's structural steps only: width shrink, low-rank, then
    the hot/cold split of embedding tables (``hot_rows``; ``row_counts`` ranks their rows,
    see ``compress._tiers``).

    Shapes depend only on the architecture and the plan, so the artifact loader calls this on an
    untrained architecture to rebuild a compressed model's shapes before loading its weights.
    """
    check_plan(model, plan)
    model = shrink_width(model, plan.width, example_input, heads=plan.heads)
    ratios = {n: lp.rank_ratio for n, lp in plan.layers.items() if lp.rank_ratio < 1.0}
    if ratios:
        model = factorize(model, ratios)
    tiers = tiered_layers(plan)
    if tiers:  # model is a copy by now (shrink_width copies)
        split_tables(model, tiers, row_counts)
    set_quant_records(model, {})
    return model


def apply(
    model: nn.Module,
    plan: Plan,
    task: Task | None = None,
    *,
    teacher: nn.Module | None = None,
    example_input: Inputs | None = None,
    seed: int = 0,
    deadline: float | None = None,
    device: str | torch.device = "cpu",
    stop: Callable[[int, float], bool] | None = None,
    teacher_outputs: torch.Tensor | None = None,
    row_counts: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Compress ``model`` according to ``plan`` and return a new module (input untouched).

    Order: structured width shrink (torch-pruning, weights inherited) -> low-rank SVD
    factorization -> magnitude pruning (masks kept) -> k-bit quantization with straight-through
    fake quantization (with ``plan.calibration == "gptq"``: GPTQ rounding from
    ``CALIBRATION_SAMPLES`` train examples of ``task``, pruning then happens at once before
    it; see ``compress._gptq``) -> distillation fine-tune from ``teacher`` (default: ``model``
    itself) on ``task``'s data, if ``task`` is given and ``plan.finetune.epochs > 0``, starting
    from GPTQ's rounding and keeping its scales. The result's weights
    are baked to the exact values an artifact stores. ``device="cuda"`` fine-tunes on a GPU
    (the input model stays where it is); the result is always returned on the CPU.
    ``stop(epochs_run, best_val)`` may end the fine-tune early (see ``distill``); a codebook
    plan stopped that way gets one epoch of centroid fine-tune instead of the rest.
    ``teacher_outputs`` may pass the teacher's selected outputs on the in-memory train split
    (``task.predict(teacher, "train")``) when the caller caches them across plans; otherwise
    they are computed once here and shared by both fine-tunes of a codebook plan.
    ``row_counts`` (plan layer name -> lookups per row) ranks the rows of the tables a plan
    splits (``hot_rows``, see ``compress._tiers``); by default they are counted on the first
    ``COUNT_SAMPLES`` train examples of ``task``.

    Example:
        >>> from autocompress.tasks import get_task
        >>> task = get_task("digits-mlp")
        >>> plan = Plan.uniform(["fc1", "fc2", "fc3"], sparsity=0.5, bits=8).replace(
        ...     finetune=FinetuneSettings(epochs=1))
        >>> small = apply(task.teacher(), plan, task)
        >>> float((small.fc1.weight == 0).float().mean()) >= 0.5
        True
    """
    check_plan(model, plan)
    if plan.calibration != "none" and task is None:
        raise PlanError(
            f"calibration={plan.calibration!r} needs calibration inputs from a task's train "
            "split: pass task= or use calibration='none'"
        )
    ft = plan.finetune
    if ft.distill == "hidden" and task is not None and ft.epochs > 0 and not hidden_blocks(model):
        raise PlanError(  # before GPTQ and the rest, which take minutes on big models
            f"finetune.distill='hidden' needs repeated blocks (a ModuleList of one class) "
            f"and {type(model).__name__} has none: use distill: output"
        )
    if example_input is None:
        if task is None and (plan.width < 1.0 or plan.head_fraction < 1.0):
            raise PlanError(
                "width or heads < 1 needs an example input: pass task= or example_input="
            )
        example_input = task.example_input() if task is not None else None
    tiers = tiered_layers(plan)
    counts = row_counts
    for name in set(tiers) & set(counts or {}):  # before any copy or counting
        rows = model.get_submodule(name).num_embeddings
        if tuple(counts[name].shape) != (rows,):  # type: ignore[index]
            raise PlanError(
                f"row_counts[{name!r}] has shape {list(counts[name].shape)} but the table "  # type: ignore[index]
                f"has {rows} rows: pass one count per row"
            )
    missing = sorted(set(tiers) - set(counts or {}))
    if missing and task is None:
        raise PlanError(
            f"hot_rows on {missing} ranks rows by their use in a task's train split: "
            "pass task= (or row_counts=) or use hot_rows=0"
        )
    if missing:
        counts = {
            **(counts or {}),
            **count_rows(model, missing, calibration_inputs(task, COUNT_SAMPLES)),
        }
    teacher = (teacher if teacher is not None else model).eval()
    student = restructure(model, plan, example_input, counts) if example_input is not None else None
    if student is None:  # width == 1 and no example input: factorize and split only
        ratios = {n: lp.rank_ratio for n, lp in plan.layers.items() if lp.rank_ratio < 1.0}
        student = factorize(copy.deepcopy(model), ratios) if ratios else copy.deepcopy(model)
        if tiers:
            split_tables(student, tiers, counts)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanError("device='cuda' but torch sees no GPU: use device='cpu'")
    attach(student, plan)
    ft = plan.finetune
    if task is not None and ft.epochs > 0 and device.type != "cpu":
        student = student.to(device)
        # else the teacher is not run (hidden-state distillation runs it on every batch)
        if teacher_outputs is None or streamed_train(task) or ft.distill == "hidden":
            teacher = copy.deepcopy(teacher).to(device)
    calibrated = False
    if plan.calibration == "gptq":
        # GPTQ rounds against the final masks: pruning happens at once, before it.
        set_sparsity(student, 1.0)
        calibrate(student.to(device), calibration_inputs(task), device)  # type: ignore[arg-type]
        calibrated = True
    if task is None or ft.epochs == 0:
        if not calibrated:
            set_sparsity(student, 1.0)
        return bake(student.cpu()).eval()
    # Gradual magnitude pruning over the first part of the fine-tune (or at once if ramp == 0);
    # codebook layers are then clustered and their centroids fine-tuned (Deep Compression's
    # prune -> retrain -> share weights).
    codebooks = has_pending_codebooks(student)
    epochs = max(1, ft.epochs // 2) if codebooks else ft.epochs
    sparse = any(lp.sparsity > 0 for lp in plan.layers.values()) and not calibrated
    ramp_epochs = max(1, round(epochs * ft.ramp)) if sparse and ft.ramp > 0 else 0
    if not calibrated:  # after GPTQ the masks are final (a re-derived one could differ)
        set_sparsity(student, 0.0 if ramp_epochs else 1.0)
    soft = teacher_outputs
    if soft is None and ft.distill != "hidden":  # hidden mode runs the teacher per batch
        soft = soft_targets(teacher, task)
    first = distill(
        student,
        teacher,
        task,
        FinetuneSettings(**{**asdict(ft), "epochs": epochs}),
        seed=seed,
        deadline=deadline,
        ramp=(lambda f: set_sparsity(student, f)) if ramp_epochs else None,
        ramp_epochs=ramp_epochs,
        stop=stop,
        soft=soft,
    )
    if codebooks:
        convert_codebooks(student)
        left = 1 if first["stopped"] else max(1, ft.epochs - epochs)
        rest = FinetuneSettings(**{**asdict(ft), "epochs": left})
        distill(student, teacher, task, rest, seed=seed + 1, deadline=deadline, soft=soft)
    return bake(student.cpu()).eval()
