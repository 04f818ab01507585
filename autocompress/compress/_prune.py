"""Unstructured magnitude pruning, per layer, to an exact sparsity."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autocompress.compress._targets import layer_modules
from autocompress.spaces._plan import Plan


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask that zeroes the ``round(sparsity * numel)`` smallest-magnitude entries.

    Example:
        >>> magnitude_mask(torch.tensor([0.1, -3.0, 0.5, 2.0]), 0.5).tolist()
        [0.0, 1.0, 0.0, 1.0]
    """
    k = int(round(sparsity * weight.numel()))
    mask = torch.ones_like(weight)
    if k <= 0:
        return mask
    idx = torch.argsort(weight.detach().abs().flatten(), stable=True)[:k]
    mask.view(-1)[idx] = 0.0
    return mask


def plan_masks(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Masks of every weight the plan prunes, keyed by module fqn (e.g. ``"fc1"``, ``"fc1.0"``)."""
    masks: dict[str, torch.Tensor] = {}
    for name, lp in plan.layers.items():
        if lp.sparsity <= 0.0:
            continue
        for fqn, mod in layer_modules(model, name):
            masks[fqn] = magnitude_mask(mod.weight, lp.sparsity)
    return masks


def prune(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's per-layer sparsity applied (no fine-tune).

    Example:
        >>> from autocompress.tasks._models import DigitsMLP
        >>> m = prune(DigitsMLP(), Plan.uniform(["fc1"], sparsity=0.9))
        >>> round(float((m.fc1.weight == 0).float().mean()), 2)
        0.9
    """
    model = copy.deepcopy(model)
    masks = plan_masks(model, plan)
    with torch.no_grad():
        for fqn, mask in masks.items():
            model.get_submodule(fqn).weight.mul_(mask)
    return model
