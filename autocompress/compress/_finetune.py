"""Knowledge-distillation fine-tune of a compressed student from its teacher.

The loop a practitioner would write: batches streamed from the task's data (a seeded shuffle of
in-memory data, DataLoaders as given), teacher outputs computed once per call on in-memory data
and per batch under ``no_grad`` for streamed data, autocast on CUDA (bf16 where supported, else
fp16 with a gradient scaler), gradient accumulation, a step and a time budget, and no host sync
per step: the loss is summed on the device and checked for finiteness once per epoch and every
``CHECK_EVERY`` batches, host rows
reach the GPU through pinned memory. (Only the fp16 fallback syncs per step: the gradient
scaler reads its inf check; bf16 needs no scaler.)

Options for distilling a pretrained transformer into its compressed self (``FinetuneSettings``):
``distill="hidden"`` adds intermediate-layer distillation (each block's hidden states against
the teacher's, TinyBERT/MiniLM style: :class:`HiddenTaps`, :func:`hidden_loss`),
``dropout=False`` trains without dropout, ``warmup`` gives a per-step warmup + cosine schedule.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autocompress.compress._soft import teacher_outputs
from autocompress.errors import AutocompressError
from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks._base import Task
from autocompress.tasks._batch import (
    call_model,
    model_device,
    pick_output,
    select,
    to_device,
)
from autocompress.tasks._data import full_batch, num_examples
from autocompress.tasks._train import Snapshot, task_loss

#: Mini-batches between two reads of the summed loss (one host sync each, and at epoch end).
CHECK_EVERY = 200


class FinetuneDiverged(RuntimeError):
    """The fine-tune loss became NaN or infinite."""


def _check_finite(loss_sum: torch.Tensor) -> None:
    if not bool(torch.isfinite(loss_sum)):
        raise FinetuneDiverged(f"fine-tune loss became {float(loss_sum)}")


def soft_targets(teacher: nn.Module, task: Task) -> torch.Tensor | None:
    """The teacher's selected outputs on the whole in-memory train split (CPU), or ``None`` when
    the split is streamed (then they are computed per batch). Over the memory budget they are
    a tensor memory-mapped from a file (``compress/_soft.py``), indexed by rows the same way."""
    return teacher_outputs(teacher, task)


def streamed_train(task: Task) -> bool:
    """True when the train split is streamed (the teacher then runs per training batch)."""
    return full_batch(task.data("train")) is None


def distill_loss(
    task: Task,
    out: torch.Tensor,
    soft: torch.Tensor,
    targets: Any,
    settings: FinetuneSettings,
) -> torch.Tensor:
    """Distillation loss of student outputs ``out`` against teacher outputs ``soft``.

    Classification: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE`` over the
    last axis (every position of ``(N, T, C)`` logits); regression: ``alpha * MSE(student,
    teacher) + (1 - alpha) * MSE(student, y)``; without labels only the distillation term.
    Embedding: ``MSE`` or ``1 - cosine`` to the teacher (``task.embedding_loss``).

    Example:
        >>> from autocompress.tasks import get_task
        >>> z = torch.randn(4, 10)
        >>> abs(float(distill_loss(get_task("digits-mlp"), z, z, None, FinetuneSettings()))) < 1e-6
        True
    """
    out, soft = out.float(), soft.float()
    if task.kind == "embedding":
        if task.embedding_loss == "cosine":
            return 1.0 - F.cosine_similarity(out, soft, dim=-1).mean()
        return F.mse_loss(out, soft)
    if task.kind == "classification":
        t, c = settings.temperature, out.shape[-1]
        kd = F.kl_div(
            F.log_softmax(out.reshape(-1, c) / t, dim=1),
            F.softmax(soft.reshape(-1, c) / t, dim=1),
            reduction="batchmean",
        ) * (t * t)
    else:
        kd = F.mse_loss(out, soft)
    if targets is None or not isinstance(targets, torch.Tensor):
        return kd
    return settings.alpha * kd + (1 - settings.alpha) * task_loss(task, out, targets)


def hidden_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks: the children of its largest ``nn.ModuleList``
    (by parameter count) of at least two modules of one class (``encoder.layer.0``, ...,
    GPT-2's ``h.0``, Llama's ``layers.0``, torch's ``TransformerEncoder.layers.0``); ``[]``
    when there is none.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16)
        >>> enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> hidden_blocks(enc)
        ['layers.0', 'layers.1']
    """
    best: tuple[int, list[str]] = (0, [])
    for name, mod in model.named_modules():
        kids = list(mod.children()) if isinstance(mod, nn.ModuleList) else []
        if len(kids) < 2 or len({type(k) for k in kids}) != 1:
            continue
        size = sum(p.numel() for p in mod.parameters())
        if size > best[0]:
            prefix = f"{name}." if name else ""
            best = (size, [f"{prefix}{i}" for i in range(len(kids))])
    return best[1]


def _first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor of a module output (a tensor, a tuple/list, a dict or ``ModelOutput``)."""
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, tuple | list) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


class HiddenTaps:
    """Forward hooks recording the hidden states of a model's blocks on its latest forward:
    the input of the first block (the embeddings) and every block's output.

    ``states`` is reset at the start of each forward of ``model``, so it always holds the
    last call's tensors (with their autograd graph when gradients are on). ``remove()``
    detaches the hooks.

    Example:
        >>> layer = nn.TransformerEncoderLayer(8, 2, 16)
        >>> enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        >>> taps = HiddenTaps(enc, hidden_blocks(enc))
        >>> _ = enc(torch.randn(3, 5, 8))
        >>> [tuple(h.shape) for h in taps.states]
        [(3, 5, 8), (3, 5, 8), (3, 5, 8)]
        >>> taps.remove()
    """

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        self.states: list[torch.Tensor] = []
        mods = dict(model.named_modules())
        missing = [b for b in blocks if b not in mods]
        if missing or not blocks:
            raise AutocompressError(
                f"finetune.distill='hidden' needs the model's blocks {blocks or '(none found)'}"
                f"{f', missing {missing}' if missing else ''}: use distill: output"
            )
        self._handles = [model.register_forward_pre_hook(lambda *_: self.states.clear())]
        self._handles.append(
            mods[blocks[0]].register_forward_pre_hook(self._entry, with_kwargs=True)
        )
        for b in blocks:
            self._handles.append(mods[b].register_forward_hook(self._exit))

    def _entry(self, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h = _first_tensor(args) if args else _first_tensor(kwargs)
        if h is not None and h.is_floating_point():
            self.states.append(h)

    def _exit(self, mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        h = _first_tensor(out)
        if h is not None:
            self.states.append(h)

    def remove(self) -> None:
        """Detach every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []


def _token_mask(inputs: Any, like: torch.Tensor) -> torch.Tensor | None:
    """The batch's ``attention_mask`` as ``(N, T, 1)`` weights when it matches ``like``'s
    first two dims (padding positions then carry no loss), else ``None``."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if not isinstance(mask, torch.Tensor) or like.dim() != 3 or mask.shape != like.shape[:2]:
        return None
    return mask.unsqueeze(-1).to(like.dtype)


def hidden_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], inputs: Any = None
) -> torch.Tensor:
    """Mean over blocks of ``||s - t||^2 / ||t||^2``: each block's squared error relative to
    the teacher's hidden-state energy (scale-free across blocks and models), over the tokens
    of ``inputs["attention_mask"]`` when there is one.

    Example:
        >>> t = [torch.ones(2, 3, 4)]
        >>> float(hidden_loss([torch.zeros(2, 3, 4)], t)), float(hidden_loss(t, t))
        (1.0, 0.0)
    """
    if len(student) != len(teacher) or not teacher:
        raise AutocompressError(
            f"finetune.distill='hidden' recorded {len(student)} student and {len(teacher)} "
            "teacher hidden states: the student must keep the teacher's blocks (use distill: "
            "output)"
        )
    total = torch.zeros((), device=teacher[0].device)
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise AutocompressError(
                f"finetune.distill='hidden': a student block gives {tuple(s.shape)}, the "
                f"teacher's {tuple(t.shape)}: keep the hidden size or use distill: output"
            )
        s, t = s.float(), t.float()
        sq, ref = (s - t) ** 2, t * t
        mask = _token_mask(inputs, t)
        if mask is not None:
            sq, ref = sq * mask, ref * mask
        total = total + sq.sum() / ref.sum().clamp(min=1e-12)
    return total / len(teacher)


def _planned_steps(task: Task, s: FinetuneSettings) -> int | None:
    """Optimizer steps the settings plan (``max_steps`` caps ``epochs`` x steps per epoch),
    or ``max_steps``/``None`` when the train split's length is unknown."""
    n = num_examples(task.data("train"))
    if n is None:
        return s.max_steps or None
    per_epoch = math.ceil(math.ceil(n / s.batch_size) / s.accum_steps)
    planned = s.epochs * per_epoch
    return min(planned, s.max_steps) if s.max_steps else planned


def _step_schedule(total: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor of optimizer step ``i``: linear warmup over ``warmup * total``
    steps, then a cosine to 0 at ``total``.

    Example:
        >>> f = _step_schedule(10, 0.2)
        >>> [round(f(i), 3) for i in (0, 1, 2, 6, 10)]
        [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    warm = max(1, round(warmup * total))

    def factor(i: int) -> float:
        if i < warm:
            return (i + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (i - warm) / max(1, total - warm))))

    return factor


def _amp(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype on CUDA (bf16 if supported, else fp16), ``None`` elsewhere."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _pinned_to(obj: Any, device: torch.device) -> Any:
    """``to_device`` through page-locked host memory (an asynchronous host-to-device copy)."""
    if isinstance(obj, torch.Tensor):
        return obj.pin_memory().to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: _pinned_to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(_pinned_to(v, device) for v in obj)
    return obj


def _batches(
    task: Task,
    teacher: nn.Module,
    soft: torch.Tensor | None,
    batch_size: int,
    gen: torch.Generator,
    device: torch.device,
    autocast: Callable[[], Any],
) -> Iterator[tuple[Any, Any, torch.Tensor]]:
    """``(inputs, targets, teacher outputs)`` per training batch, on ``device``."""
    full = full_batch(task.data("train"))
    if full is not None and soft is not None:
        inputs, targets = task.split(full)
        perm = torch.randperm(len(soft), generator=gen)
        # CUDA: rows gathered on the host go through pinned memory, so the copy to the device
        # is asynchronous (no host sync per step), as DataLoader(pin_memory=True) does
        move = _pinned_to if device.type == "cuda" else to_device
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            yield (
                move(select(inputs, idx), device),
                move(select(targets, idx), device) if targets is not None else None,
                move(soft[idx], device),
            )
        return
    for inputs, targets in task.batches("train", batch_size, shuffle=True, generator=gen):
        inputs = to_device(inputs, device)
        with torch.no_grad(), autocast():
            t_out = pick_output(call_model(teacher, inputs), task.output)
        yield inputs, to_device(targets, device), t_out


def distill(
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    settings: FinetuneSettings,
    *,
    seed: int = 0,
    deadline: float | None = None,
    ramp: Callable[[float], None] | None = None,
    ramp_epochs: int = 0,
    stop: Callable[[int, float], bool] | None = None,
    soft: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fine-tune ``student`` in place from ``teacher``'s outputs and the labels.

    Loss: :func:`distill_loss`. Runs on the student's device (the teacher must be on the same
    one). Early stopping on the validation metric restores the best epoch. ``deadline`` (a
    ``time.monotonic()`` value) and ``settings.max_seconds`` stop training early, as does
    ``settings.max_steps`` (optimizer steps), keeping the best epoch so far; budgets are
    checked after every step without a device sync. ``soft`` may pass the teacher's outputs
    on the in-memory train split when the caller already has them (``soft_targets``).

    ``ramp(fraction)`` is called before each of the first ``ramp_epochs`` epochs with a cubic
    schedule reaching 1.0 at the last of them (gradual magnitude pruning); only epochs at the
    full schedule are eligible as "best", so the result always has the planned sparsity.

    ``stop(epochs_run, best_val)`` is asked after every evaluated epoch (never during the
    ramp, so a stopped model still has its planned sparsity); ``True`` ends the fine-tune there,
    keeping the best epoch (early stopping of hopeless candidates, see ``search.run``).

    Returns ``{"epochs": epochs run, "val": best val metric, "stopped": 1.0 if ``stop`` ended
    it else 0.0, "steps": optimizer steps}``.
    """
    s = settings
    if s.epochs <= 0:
        val = task.evaluate(student, "val")[task.metric_name]
        return {"epochs": 0.0, "val": val, "stopped": 0.0, "steps": 0.0}
    if s.max_seconds > 0:
        end = time.monotonic() + s.max_seconds
        deadline = end if deadline is None else min(deadline, end)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = model_device(student)
    teacher.eval()
    if soft is None and s.distill != "hidden":
        soft = soft_targets(teacher, task)
    dtype = _amp(device, s.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)

    def autocast() -> Any:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr)
    total = _planned_steps(task, s) if s.warmup > 0 else None
    if total:  # per-step warmup + cosine over the planned steps
        step_sched = torch.optim.lr_scheduler.LambdaLR(opt, _step_schedule(total, s.warmup))
        sched = None
    else:  # the default: cosine per epoch
        step_sched = None
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    taps: tuple[HiddenTaps, HiddenTaps] | None = None
    if s.distill == "hidden":
        blocks = hidden_blocks(teacher)
        taps = (HiddenTaps(student, blocks), HiddenTaps(teacher, blocks))
    run = _Run(gen, device, soft, autocast, scaler, opt, sched, step_sched, taps)
    try:
        return _train(student, teacher, task, s, run, deadline, ramp, ramp_epochs, stop)
    finally:
        for t in taps or ():
            t.remove()
            t.states.clear()


@dataclass
class _Run:
    """What :func:`distill` sets up for its epoch loop."""

    gen: torch.Generator
    device: torch.device
    soft: torch.Tensor | None
    autocast: Callable[[], Any]
    scaler: Any
    opt: torch.optim.Optimizer
    sched: Any  # per epoch, or None
    step_sched: Any  # per optimizer step, or None
    taps: tuple[HiddenTaps, HiddenTaps] | None  # (student, teacher) with distill="hidden"


def _train(
    student: nn.Module,
    teacher: nn.Module,
    task: Task,
    s: FinetuneSettings,
    run: _Run,
    deadline: float | None,
    ramp: Callable[[float], None] | None,
    ramp_epochs: int,
    stop: Callable[[int, float], bool] | None,
) -> dict[str, float]:
    """The epoch loop of :func:`distill` (its arguments, set up)."""
    gen, device, autocast, scaler, opt = run.gen, run.device, run.autocast, run.scaler, run.opt
    sched, step_sched, taps = run.sched, run.step_sched, run.taps
    ramp_epochs = min(ramp_epochs, s.epochs) if ramp is not None else 0
    snap = Snapshot()
    if ramp_epochs:
        best = -math.inf
    else:
        best = task.evaluate(student, "val")[task.metric_name]
        snap.save(student)
    bad, epochs, steps, stopped, out_of_budget = 0, 0, 0, False, False
    accum = s.accum_steps
    opt.zero_grad(set_to_none=True)
    # distill="hidden" runs the teacher on every batch (its hidden states are not cached)
    batch_soft = None if taps is not None else run.soft
    for epoch in range(s.epochs):
        if epoch < ramp_epochs:
            ramp(1.0 - (1.0 - (epoch + 1) / ramp_epochs) ** 3)
        student.train(s.dropout)
        loss_sum = torch.zeros((), device=device)
        micro = 0
        for inputs, targets, t_out in _batches(
            task, teacher, batch_soft, s.batch_size, gen, device, autocast
        ):
            with autocast():
                out = pick_output(call_model(student, inputs), task.output)
            loss = distill_loss(task, out, t_out, targets, s)
            if taps is not None:
                loss = loss + s.hidden_weight * hidden_loss(taps[0].states, taps[1].states, inputs)
                taps[0].states.clear()
            loss_sum += loss.detach()
            scaler.scale(loss / accum if accum > 1 else loss).backward()
            micro += 1
            if micro % CHECK_EVERY == 0:
                _check_finite(loss_sum)
            if micro % accum == 0:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                steps += 1
                if step_sched is not None:
                    step_sched.step()
                out_of_budget = (s.max_steps > 0 and steps >= s.max_steps) or (
                    deadline is not None and time.monotonic() > deadline
                )
                if out_of_budget:
                    break
        if micro % accum:  # the epoch's last, partial accumulation
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if step_sched is not None:
                step_sched.step()
        _check_finite(loss_sum)
        if sched is not None:
            sched.step()
        epochs += 1
        out_of_budget = out_of_budget or (deadline is not None and time.monotonic() > deadline)
        if epoch < ramp_epochs - 1:
            if out_of_budget:
                break
            continue
        score = task.evaluate(student, "val")[task.metric_name]
        if score > best:
            best, bad = score, 0
            snap.save(student)
        else:
            bad += 1
        stopped = stop is not None and stop(epochs, best)
        if bad >= s.patience or out_of_budget or stopped:
            break
    if snap.state is None:  # stopped by a budget before the schedule ended
        ramp(1.0)
        best = task.evaluate(student, "val")[task.metric_name]
    else:
        snap.restore(student)
    student.eval()
    return {
        "epochs": float(epochs),
        "val": float(best),
        "stopped": float(stopped),
        "steps": float(steps),
    }
