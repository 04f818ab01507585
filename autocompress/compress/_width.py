"""Structured width shrink: remove hidden channels for real, keeping the strongest ones.

``shrink_width`` uses torch-pruning's dependency graph so every coupled tensor (a conv's output
channels, the BatchNorm after it, the next layer's input channels, flatten index maps, residual
adds) is cut together, and the surviving channels keep their trained weights (the student inherits
them from the teacher). Channel counts depend only on the architecture, ``width`` and ``ignored``,
never on weight values, so an artifact loader can rebuild the shapes from an untrained copy.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from autocompress.errors import PlanError

# Layers whose output channels are "hidden channels" (roots of torch-pruning groups).
_ROOT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
# Layers that end a path when looking for the model's output layers.
_STOP_TYPES: tuple[type[nn.Module], ...] = (*_ROOT_TYPES, nn.MultiheadAttention)


def shrink_width(
    model: nn.Module,
    width: float,
    example_input: torch.Tensor,
    ignored: Sequence[str] = (),
) -> nn.Module:
    """A copy of ``model`` whose hidden channels are cut to ``width`` of their count.

    Every group of coupled hidden channels keeps ``max(1, floor(width * channels))`` channels,
    chosen by group L2 magnitude (torch-pruning ``MagnitudeImportance(p=2)``), with their weights.
    The model's input size and its output layers keep their size: an output layer is a
    Linear/Conv/Embedding/MultiheadAttention whose output reaches a model output without passing
    through another such layer. Layers named in ``ignored`` keep their output size too.

    Transformers: the embedding/residual width and every ``nn.MultiheadAttention`` are kept, only
    the feed-forward hidden dims (and other groups not coupled to attention) shrink. Why:
    torch-pruning cuts an attention's ``embed_dim`` with the same indices for the residual input
    and for the q/k/v outputs, which moves dims across head boundaries (the inherited attention
    weights lose their meaning) and needs the kept count divisible by ``num_heads``.

    Args:
        model: the model to shrink; never modified.
        width: fraction of hidden channels to keep, in (0, 1]; 1.0 returns an unchanged copy.
        example_input: an input batch used to trace the graph (a tuple for several inputs).
        ignored: fully qualified module names whose output channels must not shrink.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> small = shrink_width(net, 0.5, torch.randn(2, 8))
        >>> small[0].out_features, small[2].out_features
        (10, 3)
    """
    if not (isinstance(width, int | float) and 0.0 < width <= 1.0):
        raise PlanError(f"width={width!r} is outside (0, 1]: use 1.0 for no shrink")
    names = {n for n, _ in model.named_modules() if n}
    for name in ignored:
        if name not in names:
            sample = [n for n, m in model.named_modules() if isinstance(m, _STOP_TYPES)][:5]
            raise PlanError(
                f"ignored layer {name!r} is not a module of the model: use a fully qualified "
                f"name such as {sample}"
            )
    new = copy.deepcopy(model)
    if width == 1.0:
        return new

    training = {n: m.training for n, m in new.named_modules()}
    requires_grad = {n: p.requires_grad for n, p in new.named_parameters()}
    for p in new.parameters():
        p.requires_grad_(True)  # torch-pruning traces the autograd graph
    new.eval()  # batch statistics and dropout play no part in the graph
    try:
        with torch.no_grad():
            ref = _shapes(_run(new, example_input))
        keep = set(ignored) | set(output_layers(new, example_input))
        modules = dict(new.named_modules())
        ignored_layers = [modules[n] for n in sorted(keep)]
        ignored_layers += [m for m in new.modules() if isinstance(m, nn.MultiheadAttention)]
        with torch.enable_grad():  # callers (e.g. artifact loaders) may run under no_grad
            _prune(new, width, example_input, ignored_layers)
        with torch.no_grad():
            out = _shapes(_run(new, example_input))
    except PlanError:
        raise
    except Exception as e:  # torch-pruning failed on an unusual graph
        raise PlanError(
            f"width={width} could not be applied ({type(e).__name__}: {e}): list the layer "
            "that breaks in `ignored` or use width=1.0"
        ) from e
    if out != ref:
        raise PlanError(
            f"width shrink changed the output shapes {ref} -> {out}: list the output layer "
            "in `ignored`"
        )
    for n, m in new.named_modules():
        m.train(training[n])
    for n, p in new.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    return new


def output_layers(model: nn.Module, example_input: Any) -> list[str]:
    """Names of the layers whose output reaches a model output with no other layer in between.

    "Layer" means Linear, Conv1d/2d, Embedding or MultiheadAttention; found by walking the autograd
    graph of one forward pass back from the outputs. These layers keep their output size when the
    width shrinks (they define the model's output shape).

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 3))
        >>> output_layers(net, torch.randn(2, 8))
        ['2']
    """
    names = {m: n for n, m in model.named_modules()}
    producer: dict[Any, str] = {}

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.grad_fn is not None:
            producer[t.grad_fn] = names[mod]

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _STOP_TYPES)]
    try:
        with torch.enable_grad():
            out = _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in _tensors(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if fn in producer:
            found.add(producer[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return sorted(found)


def _prune(model: nn.Module, width: float, example_input: Any, ignored: list[nn.Module]) -> None:
    """Cut every prunable group of ``model`` in place to ``floor(width * channels)`` channels."""
    # A per-layer ratio of (C - k - 0.5) / C makes torch-pruning keep int(k + 0.5) == k channels
    # exactly, free of float round-off in ``1 - ratio``.
    ratios: dict[nn.Module, float] = {}
    for m in model.modules():
        if isinstance(m, _ROOT_TYPES):
            c = _out_channels(m)
            k = max(1, math.floor(width * c + 1e-9))
            ratios[m] = max(0.0, (c - k - 0.5) / c)
    with warnings.catch_warnings():
        # torch-pruning warns about unwrapped nn.Parameters (e.g. positional embeddings) and
        # prunes their last non-singleton dim, which is the channel dim in common layouts.
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=ignored,
            root_module_types=list(_ROOT_TYPES),
        )
        pruner.step()
    del pruner


def _out_channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Embedding):
        return m.embedding_dim
    return m.out_channels  # type: ignore[return-value]


def _run(model: nn.Module, x: Any) -> Any:
    return model(*x) if isinstance(x, tuple | list) else model(x)


def _tensors(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, tuple | list):
        for o in out:
            yield from _tensors(o)
    elif isinstance(out, dict):
        for o in out.values():
            yield from _tensors(o)


def _shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in _tensors(out)]
