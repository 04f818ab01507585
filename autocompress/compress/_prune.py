"""Unstructured magnitude pruning, per layer, to an exact sparsity; and which tensors a plan's
layer names govern (module weights, parameter-level weights, factors, tied aliases)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from autocompress.errors import PlanError
from autocompress.spaces._discover import param_holders, weight_kind
from autocompress.spaces._plan import LayerPlan, Plan

Holders = dict[int, list[tuple[str, nn.Module, str]]]


@dataclass
class WeightTarget:
    """One weight tensor a plan layer governs.

    Args:
        key: mask key: the plan layer name, ``name.0`` / ``name.1`` for the factors of a
            factorized layer, or the parameter name of a parameter-level layer.
        param: the tensor itself (shared by every holder when tied).
        holders: every ``(module fqn, module, attribute)`` path to it (tied aliases included).
        axis: its output-channel dimension (1 for HF ``Conv1D``).
    """

    key: str
    param: nn.Parameter
    holders: list[tuple[str, nn.Module, str]]
    axis: int = 0

    def slots(self) -> list[tuple[nn.Module, str]]:
        """Distinct ``(module, attribute)`` slots holding the tensor (one per module object)."""
        seen: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for _, mod, attr in self.holders:
            seen.setdefault((id(mod), attr), (mod, attr))
        return list(seen.values())


def _target(index: Holders, key: str, mod: nn.Module, attr: str, fqn: str) -> WeightTarget:
    p = mod._parameters.get(attr)
    kind = weight_kind(mod, attr)
    if p is None or kind is None:
        raise PlanError(
            f"layer {key!r} is not a compressible weight ({type(mod).__name__}.{attr}): "
            "see CompressionSpace.from_model(model).layer_names"
        )
    return WeightTarget(key, p, index.get(id(p), [(fqn, mod, attr)]), kind[1])


def weight_targets(model: nn.Module, name: str, index: Holders | None = None) -> list[WeightTarget]:
    """The weight tensors of plan layer ``name``: a module's weight, both low-rank factors of a
    factorized layer (an ``nn.Sequential`` at the same name), both tables of a split embedding
    (``<name>.hot``, ``<name>.cold`` of a ``TieredEmbedding``), or a parameter-level weight
    (``"lstm.weight_ih_l0"``).

    Example:
        >>> [t.key for t in weight_targets(nn.Sequential(nn.Linear(2, 3)), "0")]
        ['0']
    """
    index = param_holders(model) if index is None else index
    try:
        mod: nn.Module | None = model.get_submodule(name)
    except AttributeError:
        mod = None
    if mod is not None:
        from autocompress.compress._tiers import TieredEmbedding

        if isinstance(mod, TieredEmbedding):  # hot rows, then cold rows (compress._tiers)
            return [
                _target(index, f"{name}.{part}", getattr(mod, part), "weight", f"{name}.{part}")
                for part in ("hot", "cold")
            ]
        if (
            isinstance(mod, nn.Sequential)
            and len(mod) > 0
            and all(weight_kind(m, "weight") is not None for m in mod)
        ):
            return [
                _target(index, f"{name}.{i}", m, "weight", f"{name}.{i}") for i, m in enumerate(mod)
            ]
        return [_target(index, name, mod, "weight", name)]
    owner, _, attr = name.rpartition(".")
    try:
        omod = model.get_submodule(owner)
    except AttributeError as e:
        raise PlanError(f"plan names layer {name!r}, which the model does not have") from e
    if attr not in omod._parameters:
        raise PlanError(f"plan names layer {name!r}, which the model does not have")
    return [_target(index, name, omod, attr, owner)]


def plan_targets(model: nn.Module, plan: Plan) -> list[tuple[WeightTarget, LayerPlan]]:
    """Every tensor the plan compresses, once each, with its knobs.

    A tied tensor named twice (e.g. GPT-2's ``transformer.wte`` and ``lm_head``) must carry the
    same knobs under both names; different knobs are refused with a :class:`PlanError`.
    """
    index = param_holders(model)
    out: dict[int, tuple[str, WeightTarget, LayerPlan]] = {}
    for name, lp0 in plan.layers.items():
        for t in weight_targets(model, name, index):
            lp = _tier_plan(lp0, t.key, name)
            prev = out.get(id(t.param))
            if prev is None:
                out[id(t.param)] = (name, t, lp)
            elif prev[2] != lp:
                raise PlanError(
                    f"layers {prev[0]!r} and {name!r} are one tied tensor but the plan gives "
                    f"them different knobs: give both the same knobs or name only {prev[0]!r}"
                )
    return [(t, lp) for _, t, lp in out.values()]


def _tier_plan(lp: LayerPlan, key: str, name: str) -> LayerPlan:
    """The knobs of one table of a split embedding (``hot_rows``): the hot table at
    ``hot_bits``, the cold one at ``bits``; any other weight keeps ``lp``."""
    if lp.hot_rows <= 0 or key == name:
        return lp
    from dataclasses import replace

    if key == f"{name}.hot":
        group = lp.group if lp.hot_bits <= 8 else 0
        return replace(lp, bits=lp.hot_bits, group=group, hot_rows=0.0, hot_bits=8)
    return replace(lp, hot_rows=0.0, hot_bits=8)


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
    """Masks of every weight the plan prunes, keyed by :attr:`WeightTarget.key` (``"fc1"``,
    ``"fc1.0"``, ``"lstm.weight_ih_l0"``); a tied tensor once, under the name the plan used."""
    return {
        t.key: magnitude_mask(t.param, lp.sparsity)
        for t, lp in plan_targets(model, plan)
        if lp.sparsity > 0.0
    }


def prune(model: nn.Module, plan: Plan) -> nn.Module:
    """A copy of ``model`` with the plan's per-layer sparsity applied (no fine-tune).

    Example:
        >>> from autocompress.tasks._models import DigitsMLP
        >>> m = prune(DigitsMLP(), Plan.uniform(["fc1"], sparsity=0.9))
        >>> round(float((m.fc1.weight == 0).float().mean()), 2)
        0.9
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        for t, lp in plan_targets(model, plan):
            if lp.sparsity > 0.0:
                t.param.mul_(magnitude_mask(t.param, lp.sparsity))
    return model
