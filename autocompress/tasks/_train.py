"""Teacher training loop and safe state saving."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from autocompress.tasks._base import Task


def task_loss(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classification tasks, mean squared error for regression ones."""
    if task.kind == "classification":
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets)


def train_teacher(task: Task, model: nn.Module) -> nn.Module:
    """Train ``model`` on ``task``'s train split, keeping the best epoch on val."""
    s = task.train
    gen = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    x, y = task.data("train").tensors
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, s.epochs))
    best, best_state, bad = -float("inf"), copy.deepcopy(model.state_dict()), 0
    for _ in range(s.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), s.batch_size):
            idx = perm[i : i + s.batch_size]
            opt.zero_grad()
            task_loss(task, model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
        score = task.evaluate(model, "val")[task.metric_name]
        if score > best:
            best, best_state, bad = score, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= s.patience:
                break
    model.load_state_dict(best_state)
    return model.eval()


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
