"""Map plan layer names to the weight tensors they govern after restructuring."""

from __future__ import annotations

from torch import nn

from autocompress.errors import PlanError
from autocompress.spaces._discover import COMPRESSIBLE


def layer_modules(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The weight-holding modules of plan layer ``name``: itself, or both low-rank factors.

    A factorized layer is an ``nn.Sequential`` of two modules at the original name, so its
    weights are ``name.0.weight`` and ``name.1.weight``.
    """
    try:
        mod = model.get_submodule(name)
    except AttributeError as e:
        raise PlanError(f"plan names layer {name!r}, which the model does not have") from e
    if isinstance(mod, nn.Sequential) and all(isinstance(m, COMPRESSIBLE) for m in mod):
        return [(f"{name}.{i}", m) for i, m in enumerate(mod)]
    if not isinstance(mod, COMPRESSIBLE):
        raise PlanError(
            f"layer {name!r} is a {type(mod).__name__}, not Linear/Conv1d/Conv2d/Embedding"
        )
    return [(name, mod)]
