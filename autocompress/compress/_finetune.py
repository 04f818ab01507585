"""Knowledge-distillation fine-tune of a compressed student from its teacher."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from autocompress.spaces._plan import FinetuneSettings
from autocompress.tasks._base import Task


class FinetuneDiverged(RuntimeError):
    """The fine-tune loss became NaN or infinite."""


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
) -> dict[str, float]:
    """Fine-tune ``student`` in place from ``teacher``'s soft targets and the labels.

    Loss: ``alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE`` for classification,
    ``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, y)`` for regression. Early
    stopping on the validation metric restores the best epoch. ``deadline`` (a
    ``time.monotonic()`` value) stops training early, keeping the best epoch so far.

    ``ramp(fraction)`` is called before each of the first ``ramp_epochs`` epochs with a cubic
    schedule reaching 1.0 at the last of them (gradual magnitude pruning); only epochs at the
    full schedule are eligible as "best", so the result always has the planned sparsity.

    ``stop(epochs_run, best_val)`` is asked after every evaluated epoch (never during the
    ramp, so a stopped model still has its planned sparsity); ``True`` ends the fine-tune there,
    keeping the best epoch (early stopping of hopeless candidates, see ``search.run``).

    Returns ``{"epochs": epochs run, "val": best val metric, "stopped": 1.0 if ``stop`` ended
    it else 0.0}``.
    """
    s = settings
    if s.epochs <= 0:
        val = task.evaluate(student, "val")[task.metric_name]
        return {"epochs": 0.0, "val": val, "stopped": 0.0}
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    x, y = (t.to(device) for t in task.data("train").tensors)
    with torch.no_grad():
        soft = task.predict(teacher, "train").to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs)
    ramp_epochs = min(ramp_epochs, s.epochs) if ramp is not None else 0
    if ramp_epochs:
        best, best_state = -math.inf, None
    else:
        best = task.evaluate(student, "val")[task.metric_name]
        best_state = copy.deepcopy(student.state_dict())
    bad, epochs, stopped = 0, 0, False
    t = s.temperature
    for epoch in range(s.epochs):
        if epoch < ramp_epochs:
            ramp(1.0 - (1.0 - (epoch + 1) / ramp_epochs) ** 3)
        student.train()
        perm = torch.randperm(len(x), generator=gen).to(device)
        for i in range(0, len(x), s.batch_size):
            idx = perm[i : i + s.batch_size]
            out = student(x[idx])
            if task.kind == "classification":
                kd = F.kl_div(
                    F.log_softmax(out / t, dim=1),
                    F.softmax(soft[idx] / t, dim=1),
                    reduction="batchmean",
                ) * (t * t)
                hard = F.cross_entropy(out, y[idx])
            else:
                kd, hard = F.mse_loss(out, soft[idx]), F.mse_loss(out, y[idx])
            loss = s.alpha * kd + (1 - s.alpha) * hard
            if not math.isfinite(loss.item()):
                raise FinetuneDiverged(f"fine-tune loss became {float(loss)}")
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        epochs += 1
        out_of_time = deadline is not None and time.monotonic() > deadline
        if epoch < ramp_epochs - 1:
            if out_of_time:
                break
            continue
        score = task.evaluate(student, "val")[task.metric_name]
        if score > best:
            best, best_state, bad = score, copy.deepcopy(student.state_dict()), 0
        else:
            bad += 1
        stopped = stop is not None and stop(epochs, best)
        if bad >= s.patience or out_of_time or stopped:
            break
    if best_state is None:  # stopped by the deadline before the schedule ended
        ramp(1.0)
        best = task.evaluate(student, "val")[task.metric_name]
    else:
        student.load_state_dict(best_state)
    student.eval()
    return {"epochs": float(epochs), "val": float(best), "stopped": float(stopped)}
