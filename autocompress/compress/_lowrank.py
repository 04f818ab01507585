"""Low-rank factorization: replace a layer by two thinner ones from its truncated SVD.

A layer at ``name`` becomes a :class:`LowRank` (an ``nn.Sequential(first, second)``), so its
parameters are renamed ``name.0.weight``, ``name.1.weight``, ``name.1.bias``:

* ``Linear(in, out)`` -> ``Linear(in, r, bias=False)``, ``Linear(r, out)``
* Hugging Face ``Conv1D(nf=out, nx=in)`` (GPT-2) -> the same two Linears
* ``Conv{1,2}d(in, out, k)`` (groups=1) -> ``Conv(in, r, k, stride, padding, dilation,
  bias=False)``, ``Conv(r, out, 1)``
* ``Embedding(num, dim)`` -> ``Embedding(num, r)``, ``Linear(r, dim, bias=False)``

A ``LowRank`` still answers as the layer it replaced: ``.weight`` is the product of the factors in
the original layout, ``.bias`` the second factor's bias, and the size attributes
(``in_features``, ``out_channels``, ``embedding_dim``, ``nf``, ...) are kept, because Hugging Face
code reads them directly (ViT's ``projection.weight.dtype``, T5's ``wo.weight``).

With ``W = U S Vt`` truncated to rank ``r``, the first factor holds ``sqrt(S) Vt`` and the
second ``U sqrt(S)``, so their product is the best rank-``r`` approximation of ``W``. The rank is
a fraction (``rank_ratio``) of the *break-even rank*, the largest rank whose two factors hold
fewer parameters than the original, so any ratio below 1 saves parameters and 1.0 means "leave
the layer alone".
Shapes depend only on the architecture and the ratios, so a loader can rebuild them on an untrained
model before loading saved weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from autocompress.errors import PlanError

FACTORIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
_SIZE_ATTRS: dict[str, tuple[str, ...]] = {
    "linear": ("in_features", "out_features"),
    "conv1d": ("nf", "nx"),
    "conv": ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation"),
    "embedding": ("num_embeddings", "embedding_dim", "padding_idx"),
}


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (GPT-2): a Linear with a transposed ``(in, out)`` weight."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _kind(m: nn.Module) -> str:
    if _is_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding"
    return "conv"


class LowRank(nn.Sequential):
    """Two low-rank factors that still answer as the layer they replaced.

    Runs as ``second(first(x))``; ``weight`` rebuilds the full weight (in the original layer's
    layout and dtype) for code that reads it, ``bias`` is the second factor's bias, and the
    original layer's size attributes are kept.

    Example:
        >>> lr = factorize(nn.Sequential(nn.Linear(64, 300)), {"0": 0.5})[0]
        >>> type(lr).__name__, tuple(lr.weight.shape), lr.out_features
        ('LowRank', (300, 64), 300)
    """

    def __init__(self, first: nn.Module, second: nn.Module, like: nn.Module) -> None:
        super().__init__(first, second)
        self.kind = _kind(like)
        for attr in _SIZE_ATTRS[self.kind]:
            setattr(self, attr, getattr(like, attr))

    @property
    def weight(self) -> torch.Tensor:
        a, b = self[0].weight, self[1].weight
        if self.kind == "linear":
            return b @ a
        if self.kind == "conv1d":
            return (b @ a).T
        if self.kind == "embedding":
            return a @ b.T
        return (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.kind == "embedding" else self[1].bias


# Parents that pass their children's weights to fused kernels (MHA's out_proj, the encoder
# layers' fast path): a LowRank would rebuild the full weight on every call and save nothing.
_WEIGHT_READERS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def break_even_rank(module: nn.Module) -> int:
    """Largest rank whose two factors hold strictly fewer weights than ``module``.

    For a weight of effective shape ``(n_out, n_in)`` (``n_in = in_channels/groups * prod(kernel)``
    for a conv, ``(num_embeddings, embedding_dim)`` for an Embedding) this is the largest ``r``
    with ``r * (n_in + n_out) < n_in * n_out``, i.e. ``floor(n_in*n_out / (n_in+n_out))``, minus
    one when that quotient is exact (equal counts save nothing). 0 means no rank saves weights.

    Example:
        >>> break_even_rank(nn.Linear(300, 100)), break_even_rank(nn.Linear(64, 300))
        (74, 52)
    """
    n_in, n_out = _dims(module)
    return (n_in * n_out - 1) // (n_in + n_out)


def rank_for(module: nn.Module, ratio: float) -> int:
    """The rank used for ``module`` at ``rank_ratio=ratio``: ``max(1, round(ratio * break_even))``.

    Halves round up. Example:
        >>> rank_for(nn.Linear(300, 100), 0.5)
        37
    """
    return max(1, math.floor(ratio * break_even_rank(module) + 0.5))


def factorizable_layers(model: nn.Module) -> list[str]:
    """Fully qualified names of the layers :func:`factorize` can split (break-even rank >= 1).

    Grouped convs, layers inside ``nn.MultiheadAttention`` / ``nn.Transformer*Layer`` (which read
    the weights directly) and layers too small to save anything are left out.

    Example:
        >>> factorizable_layers(nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 10)))
        ['2']
    """
    out = []
    for name, module in model.named_modules():
        if name and _why_not(model, name, module) is None and break_even_rank(module) >= 1:
            out.append(name)
    return out


def factorize(model: nn.Module, rank_ratios: Mapping[str, float]) -> nn.Module:
    """A copy of ``model`` with each named layer split into two low-rank factors (a
    :class:`LowRank` at the same name).

    Args:
        model: the model; never modified. Trained or not (the shapes are the same).
        rank_ratios: fully qualified module name -> rank ratio in (0, 1]. Layers with ratio 1.0
            or with break-even rank 0 are left as they are.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
        >>> small = factorize(net, {"0": 0.5})
        >>> tuple(small[0][0].weight.shape), tuple(small[0][1].weight.shape)
        ((26, 64), (300, 26))
    """
    modules = dict(model.named_modules())
    for name, ratio in rank_ratios.items():
        if name not in modules or not name:
            sample = factorizable_layers(model)[:5]
            raise PlanError(
                f"layer {name!r} is not a module of the model: use a fully qualified name such "
                f"as {sample}"
            )
        if not (isinstance(ratio, int | float) and 0.0 < ratio <= 1.0):
            raise PlanError(
                f"rank_ratio={ratio!r} for layer {name!r} is outside (0, 1]: use 1.0 for none"
            )
        reason = _why_not(model, name, modules[name])
        if reason is not None:
            raise PlanError(f"layer {name!r} cannot be factorized ({reason}): set rank_ratio=1.0")
    new = copy.deepcopy(model)
    for name, ratio in sorted(rank_ratios.items()):
        old = new.get_submodule(name)
        if ratio == 1.0 or break_even_rank(old) < 1:
            continue
        seq = _split(old, rank_for(old, ratio))
        seq.train(old.training)
        seq.requires_grad_(old.weight.requires_grad)
        parent_name, _, child = name.rpartition(".")
        setattr(new.get_submodule(parent_name), child, seq)
    return new


def _dims(module: nn.Module) -> tuple[int, int]:
    """``(n_in_eff, n_out)`` of the weight seen as a matrix."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return int(module.nx), int(module.nf)
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        n_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        return n_in, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise PlanError(
        f"{type(module).__name__} cannot be factorized: only Linear, Conv1D, Conv1d, Conv2d, "
        "Embedding"
    )


def _why_not(model: nn.Module, name: str, module: nn.Module) -> str | None:
    if isinstance(module, LowRank):
        return "already factorized"
    if not (isinstance(module, FACTORIZABLE) or _is_conv1d(module)):
        return f"{type(module).__name__} is not one of Linear, Conv1D, Conv1d, Conv2d, Embedding"
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups != 1:
        return f"grouped conv with groups={module.groups}"
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        return "Embedding with max_norm renormalizes rows"
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, _WEIGHT_READERS):
        return f"its parent {type(parent).__name__} reads the weight directly"
    return None


@torch.no_grad()
def _factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``a @ b`` the best rank-``rank`` approximation of the matrix ``w``."""
    u, s, vt = torch.linalg.svd(w.detach().to(torch.float64), full_matrices=False)
    root = s[:rank].sqrt()
    a = u[:, :rank] * root
    b = root[:, None] * vt[:rank]
    return a.to(w.dtype), b.to(w.dtype)


@torch.no_grad()
def _split(m: nn.Module, r: int) -> LowRank:
    kw = {"device": m.weight.device, "dtype": m.weight.dtype}
    if isinstance(m, nn.Linear) or _is_conv1d(m):
        n_in, n_out = _dims(m)
        a, b = _factors(m.weight.T if _is_conv1d(m) else m.weight, r)  # (out, r), (r, in)
        first = nn.Linear(n_in, r, bias=False, **kw)
        second = nn.Linear(r, n_out, bias=m.bias is not None, **kw)
    elif isinstance(m, nn.Embedding):
        a, b = _factors(m.weight, r)  # (num, r), (r, dim)
        first = nn.Embedding(
            m.num_embeddings,
            r,
            padding_idx=m.padding_idx,
            scale_grad_by_freq=m.scale_grad_by_freq,
            sparse=m.sparse,
            **kw,
        )
        second = nn.Linear(r, m.embedding_dim, bias=False, **kw)
        first.weight.copy_(a)
        if m.padding_idx is not None:
            first.weight[m.padding_idx] = 0.0
        second.weight.copy_(b.T)
        return LowRank(first, second, m)
    else:
        conv = nn.Conv1d if isinstance(m, nn.Conv1d) else nn.Conv2d
        a, b = _factors(m.weight.reshape(m.out_channels, -1), r)
        first = conv(
            m.in_channels,
            r,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            bias=False,
            padding_mode=m.padding_mode,
            **kw,
        )
        second = conv(r, m.out_channels, 1, bias=m.bias is not None, **kw)
        b = b.reshape(first.weight.shape)
        a = a.reshape(second.weight.shape)
    first.weight.copy_(b)
    second.weight.copy_(a)
    if m.bias is not None:
        second.bias.copy_(m.bias)
    return LowRank(first, second, m)
