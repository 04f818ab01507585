"""Discovery of the compressible weights of any ``nn.Module``, and of every tensor left out.

A *layer* of the compression space is one weight tensor with one set of knobs. It is named

* by its module's fully qualified name when the tensor is that module's ``weight`` (``Linear``,
  ``Conv1d/2d/3d``, ``Embedding`` and Hugging Face ``transformers.pytorch_utils.Conv1D``):
  ``"fc1"``, ``"transformer.h.0.attn.c_attn"``;
* by the parameter's fully qualified name otherwise (*parameter-level* layers: the weights of
  ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and ``nn.MultiheadAttention``'s packed ``in_proj_weight``,
  or its separate ``q/k/v_proj_weight``): ``"lstm.weight_ih_l0"``, ``"lstm.weight_hh_l1_reverse"``,
  ``"blocks.0.attn.in_proj_weight"``.

A tensor held by several modules (tied weights: GPT-2's ``transformer.wte`` and ``lm_head``, T5's
``shared`` / ``encoder.embed_tokens`` / ``decoder.embed_tokens`` / ``lm_head``) is ONE layer,
named after its first holder in ``named_modules()`` order, with the others in ``aliases``.

Every other parameter tensor is listed in ``skipped`` (parameter name -> reason), so nothing is
left out silently; ``coverage`` is the share of the model's parameters (tied tensors counted once)
that lives in compressible layers. ``transformers`` is never imported: its ``Conv1D`` is matched
by class name and module path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

# Modules whose ``weight`` is a layer of the space (the engine's factor check uses it too).
COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_EXTRA_WEIGHT_MODULES = (nn.Conv3d,)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (a subclass of) Hugging Face's ``Conv1D``, without importing it.

    Its weight is stored transposed, ``(in_features, out_features)``, and used as
    ``x @ weight + bias``: the output channels are on dim 1.

    Example:
        >>> is_hf_conv1d(nn.Linear(2, 3))
        False
    """
    return any(
        c.__name__ == "Conv1D" and c.__module__.startswith("transformers.")
        for c in type(module).__mro__
    )


def weight_kind(module: nn.Module, attr: str) -> tuple[str, int, bool] | None:
    """``(kind, output axis, parameter-level)`` if ``module.<attr>`` is a compressible weight.

    ``None`` means the tensor is not compressible. Parameter-level weights are named by their
    parameter name in a plan; module-level ones by the module name.

    Example:
        >>> weight_kind(nn.LSTM(3, 4), "weight_hh_l0")
        ('LSTM', 0, True)
        >>> weight_kind(nn.Linear(3, 4), "bias") is None
        True
    """
    cls = type(module).__name__
    if attr == "weight" and isinstance(module, COMPRESSIBLE + _EXTRA_WEIGHT_MODULES):
        return cls, 0, False
    if attr == "weight" and is_hf_conv1d(module):
        return "Conv1D", 1, False
    if isinstance(module, nn.RNNBase) and attr.startswith("weight_"):
        return cls, 0, True
    if isinstance(module, nn.MultiheadAttention) and attr in _MHA_WEIGHTS:
        return cls, 0, True
    return None


NOT_A_TABLE = "embedding tables only"
"""``LayerInfo.tiers`` of a weight that is not an embedding table (no ``hot_rows``)."""


@dataclass(frozen=True)
class LayerInfo:
    """A compressible weight tensor found in a model (one set of knobs).

    Args:
        name: layer name used in plans: the module's fully qualified name for a module's
            ``weight``, the parameter's fully qualified name for parameter-level weights.
        kind: class name of the module holding it (``Linear``, ``Conv1D``, ``LSTM``...).
        params: number of weight parameters (bias excluded).
        shape: weight shape.
        factorizable: whether low-rank factorization applies.
        note: why a knob is unavailable, if one is.
        tensor: fully qualified parameter name (``"fc1.weight"``, ``"lstm.weight_ih_l0"``).
        axis: the output-channel dimension of the weight, along which uniform quantization keeps
            one scale per channel (1 for HF ``Conv1D``, whose weight is ``(in, out)``).
        aliases: other layer names holding the same tensor (tied weights); a plan may name any
            of them, with the same knobs.
        tiers: why the table cannot be split into hot and cold rows (``hot_rows``); empty for
            an ``nn.Embedding`` (or a subclass that only looks rows up) that can.
    """

    name: str
    kind: str
    params: int
    shape: tuple[int, ...]
    factorizable: bool = True
    note: str = ""
    tensor: str = ""
    axis: int = 0
    aliases: tuple[str, ...] = ()
    tiers: str = NOT_A_TABLE

    def __post_init__(self) -> None:
        if not self.tensor:
            object.__setattr__(self, "tensor", f"{self.name}.weight")


@dataclass(frozen=True)
class Discovery:
    """Result of :func:`discover`: layers, skipped tensors with reasons, parameter counts."""

    layers: list[LayerInfo]
    skipped: dict[str, str] = field(default_factory=dict)
    total_params: int = 0

    @property
    def covered_params(self) -> int:
        """Parameters in compressible layers (tied tensors once)."""
        return sum(layer.params for layer in self.layers)

    @property
    def coverage(self) -> float:
        """``covered_params / total_params`` (1.0 for a model without parameters)."""
        return self.covered_params / self.total_params if self.total_params else 1.0


def param_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(parameter) -> [(module fqn, module, attribute)]``, every path to every parameter.

    Tied parameters have several entries (first in ``named_modules()`` order first).

    Example:
        >>> a, b = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
        >>> b.weight = a.weight
        >>> holders = param_holders(nn.ModuleDict({"a": a, "b": b}))[id(a.weight)]
        >>> [(n, attr) for n, _, attr in holders]
        [('a', 'weight'), ('b', 'weight')]
    """
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((mname, mod, attr))
    return out


def _layer_name(mname: str, attr: str, param_level: bool) -> str:
    if not mname:  # a parameter of the root module itself
        return attr
    return f"{mname}.{attr}" if param_level else mname


def _skip_reason(module: nn.Module, attr: str, p: nn.Parameter) -> str:
    cls = type(module).__name__
    if p.dim() <= 1 and (
        "norm" in cls.lower() or isinstance(module, nn.modules.batchnorm._NormBase)
    ):
        role = "shift" if "bias" in attr else "scale"
        return f"1-D norm {role} of {cls} (tiny, precision-sensitive): kept as is"
    if "bias" in attr:
        if attr == "bias" and weight_kind(module, "weight") is not None:
            return f"bias of {cls}: kept (stored fp16 when its weight is quantized)"
        return f"bias {attr!r} of {cls}: kept as is (not quantized)"
    if attr == "weight" and isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{cls} weight: transposed convolutions are not supported yet"
    if p.dim() <= 1:
        return f"1-D parameter {attr!r} of {cls}: kept as is"
    if "pos" in attr.lower() or "position" in cls.lower():
        return f"raw position-embedding parameter of {cls} (read directly): kept as is"
    return f"raw {p.dim()}-D parameter {attr!r} of {cls}, not a known layer type: kept as is"


def _not_factorizable(model: nn.Module, name: str, module: nn.Module, can: set[str]) -> str:
    """Why low rank is not offered for a module-level layer ('' if it is)."""
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups}): one SVD per group is not implemented"
    if isinstance(module, nn.Conv3d):
        return "Conv3d: low rank is implemented for Conv1d/Conv2d only"
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads out_proj.weight directly"
    if name in can:
        return ""
    from autocompress.compress import _lowrank

    why = getattr(_lowrank, "_why_not", None)
    reason = why(model, name, module) if why is not None else None
    return reason or "factorizing would not save parameters here"


def discover(model: nn.Module) -> Discovery:
    """Every compressible weight of ``model`` as a layer, every other parameter with its reason.

    Example:
        >>> d = discover(nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)))
        >>> [layer.name for layer in d.layers], sorted(d.skipped), round(d.coverage, 2)
        (['0'], ['0.bias', '1.bias', '1.weight'], 0.57)
    """
    from autocompress.compress._lowrank import factorizable_layers
    from autocompress.compress._tiers import unsplittable

    can_factorize = set(factorizable_layers(model))
    layers: list[LayerInfo] = []
    skipped: dict[str, str] = {}
    total = 0
    for holders in param_holders(model).values():
        mname, mod, attr = holders[0]
        p = mod._parameters[attr]
        total += p.numel()
        kinds = [(h, weight_kind(h[1], h[2])) for h in holders]
        found = [(h, k) for h, k in kinds if k is not None]
        names = [_layer_name(h[0], h[2], k[2]) for h, k in found]
        if not found:
            reason = _skip_reason(mod, attr, p)
            others = [f"{h[0]}.{h[2]}" for h in holders[1:]]
            skipped[f"{mname}.{attr}" if mname else attr] = reason + (
                f" (tied with {', '.join(others)})" if others else ""
            )
            continue
        (cname, cmod, cattr), (kind, axis, param_level) = found[0]
        name = names[0]
        aliases = tuple(dict.fromkeys(n for n in names[1:] if n != name))
        others = [f"{h[0]}.{h[2]}" for h in holders if h[0] != cname or h[2] != cattr]
        if param_level:
            factorizable = False
            note = (
                f"{kind} reads {cattr} directly in its forward: a factorized weight cannot be "
                "passed (sparsity and bits apply)"
            )
        elif len(holders) > 1:
            factorizable = False
            note = f"tied with {', '.join(others)}: factorizing would untie it"
        else:
            note = _not_factorizable(model, name, cmod, can_factorize)
            factorizable = not note
        tensor = f"{cname}.{cattr}" if cname else cattr
        tiers = NOT_A_TABLE
        if isinstance(cmod, nn.Embedding) and not param_level:
            tiers = unsplittable(cmod) or ""
        layers.append(
            LayerInfo(
                name,
                kind,
                p.numel(),
                tuple(p.shape),
                factorizable,
                note,
                tensor,
                axis,
                aliases,
                tiers,
            )
        )
    return Discovery(layers, skipped, total)


def discover_layers(model: nn.Module) -> tuple[list[LayerInfo], dict[str, str]]:
    """Compressible layers of ``model`` and the skipped parameter tensors with reasons.

    Shorthand for :func:`discover` without the parameter counts.

    Example:
        >>> layers, skipped = discover_layers(nn.Sequential(nn.Linear(4, 3)))
        >>> [layer.name for layer in layers], skipped
        (['0'], {'0.bias': 'bias of Linear: kept (stored fp16 when its weight is quantized)'})
    """
    d = discover(model)
    return d.layers, d.skipped
