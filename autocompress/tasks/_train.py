"""Teacher training loop, the label loss shared with the fine-tune, best-weight snapshots and
safe state saving."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from autocompress.errors import AutocompressError
from autocompress.tasks._batch import call_model, pick_output, to_device

if TYPE_CHECKING:
    from autocompress.tasks._base import Task


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The label loss: cross-entropy for classification (logits ``(N, C)`` or ``(N, T, C)``,
    targets ``-100`` ignored as in Hugging Face), mean squared error for regression.

    Example:
        >>> from autocompress.tasks import get_task
        >>> float(task_loss(get_task("digits-mlp"), torch.zeros(2, 10), torch.tensor([0, 1])))
        2.302...
    """
    if task.kind == "classification":
        c = outputs.shape[-1]
        return F.cross_entropy(outputs.reshape(-1, c), targets.reshape(-1).long())
    t = targets.to(outputs.dtype)
    return F.mse_loss(outputs, t.reshape(outputs.shape) if t.numel() == outputs.numel() else t)


class Snapshot:
    """The best weights so far, kept in one preallocated copy that is overwritten in place
    (no ``copy.deepcopy(state_dict)`` per improving epoch).

    Example:
        >>> m, snap = nn.Linear(2, 2), Snapshot()
        >>> snap.save(m)
        >>> _ = m.weight.data.zero_()
        >>> snap.restore(m)
        >>> bool(m.weight.abs().sum() > 0)
        True
    """

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    @torch.no_grad()
    def save(self, model: nn.Module) -> None:
        """Copy ``model``'s current state into the buffer (allocated on first use)."""
        sd = model.state_dict()
        same = self.state is not None and self.state.keys() == sd.keys()
        if same:
            for k, v in sd.items():
                old = self.state[k]
                if not (isinstance(v, torch.Tensor) and isinstance(old, torch.Tensor)) or (
                    old.shape != v.shape or old.dtype != v.dtype or old.device != v.device
                ):
                    same = False
                    break
        if not same:
            self.state = {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()
            }
            return
        for k, v in sd.items():
            self.state[k].copy_(v, non_blocking=True)

    def restore(self, model: nn.Module) -> None:
        """Load the saved state into ``model``."""
        if self.state is None:
            raise AutocompressError("no snapshot was saved")
        model.load_state_dict(self.state)


def train_batches(
    task: Task, batch_size: int, generator: torch.Generator, device: torch.device
) -> Any:
    """``(inputs, targets)`` training batches on ``device``: a seeded shuffle of in-memory data
    and Datasets, DataLoaders as given."""
    for inputs, y in task.batches("train", batch_size, shuffle=True, generator=generator):
        yield to_device(inputs, device), to_device(y, device)


def train_teacher(task: Task, model: nn.Module) -> nn.Module:
    """Train ``model`` on ``task``'s train split (on ``task.train.device``), keeping the best
    epoch on val; the result is returned on the CPU."""
    s = task.train
    if task.kind == "embedding":
        raise AutocompressError(
            f"task {task.name!r} is an embedding task: it cannot train a teacher without "
            "labels; pass teacher_model=... (Task.from_module / Task.from_hf do)"
        )
    device = torch.device(s.device)
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs))
    best, snap, bad = -math.inf, Snapshot(), 0
    snap.save(model)
    for _ in range(s.epochs):
        model.train()
        for inputs, y in train_batches(task, s.batch_size, gen, device):
            if y is None:
                raise AutocompressError(
                    f"task {task.name!r}: the train split has no labels to train a teacher on; "
                    "pass teacher_model=... or label the batches"
                )
            opt.zero_grad()
            task_loss(task, pick_output(call_model(model, inputs), task.output), y).backward()
            opt.step()
        sched.step()
        score = task.evaluate(model, "val")[task.metric_name]
        if score > best:
            best, bad = score, 0
            snap.save(model)
        else:
            bad += 1
            if bad >= s.patience:
                break
    snap.restore(model)
    return model.cpu().eval()


def save_state(model: nn.Module, path: Path) -> None:
    """Atomically write ``model``'s state dict as safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
