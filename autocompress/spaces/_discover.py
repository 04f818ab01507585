"""Discovery of compressible layers in any ``nn.Module``."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class LayerInfo:
    """A compressible layer found in a model.

    Args:
        name: fully qualified module name.
        kind: module class name (``Linear``, ``Conv2d``, ...).
        params: number of weight parameters (bias excluded).
        shape: weight shape.
        factorizable: whether low-rank factorization applies (False e.g. for the output
            projection of ``nn.MultiheadAttention``, whose parent reads ``out_proj.weight``
            directly, or grouped convolutions).
        note: why a knob is unavailable, if one is.
    """

    name: str
    kind: str
    params: int
    shape: tuple[int, ...]
    factorizable: bool = True
    note: str = ""


def discover_layers(model: nn.Module) -> tuple[list[LayerInfo], dict[str, str]]:
    """Compressible layers of ``model`` and the skipped parameter-holding modules with reasons.

    ``nn.MultiheadAttention`` keeps its packed ``in_proj_weight`` as a raw parameter, which is
    left uncompressed (reported in the skipped dict); its ``out_proj`` Linear is compressible
    by pruning and quantization but not factorized.

    Example:
        >>> layers, skipped = discover_layers(nn.Sequential(nn.Linear(4, 3)))
        >>> [layer.name for layer in layers]
        ['0']
    """
    from autocompress.compress._lowrank import factorizable_layers

    can_factorize = set(factorizable_layers(model))
    layers: list[LayerInfo] = []
    skipped: dict[str, str] = {}
    mha_children: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            mha_children.add(f"{name}.out_proj" if name else "out_proj")
            skipped[name] = (
                "packed in_proj_weight of nn.MultiheadAttention is a raw parameter; "
                "only its out_proj is compressed"
            )
    for name, mod in model.named_modules():
        if not isinstance(mod, COMPRESSIBLE) or not name:
            continue
        w = mod.weight
        factorizable, note = True, ""
        if name in mha_children:
            factorizable, note = False, "nn.MultiheadAttention reads out_proj.weight directly"
        elif isinstance(mod, nn.Conv1d | nn.Conv2d) and mod.groups != 1:
            factorizable, note = False, "grouped convolution"
        elif name not in can_factorize:
            factorizable, note = False, "factorizing would not save parameters here"
        layers.append(
            LayerInfo(name, type(mod).__name__, w.numel(), tuple(w.shape), factorizable, note)
        )
    return layers, skipped
