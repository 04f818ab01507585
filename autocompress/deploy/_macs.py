"""Analytic cost: multiply-accumulates (MACs) and bit operations, from the shapes of a real run.

One forward pass with hooks records, per layer, the MACs of its weight product:

* ``Linear`` and Hugging Face ``Conv1D`` (GPT-2): ``positions * in * out`` (``positions`` =
  output elements / ``out``).
* ``Conv1d/2d/3d``: ``output positions * out * in/groups * prod(kernel)``; transposed convs
  count per input position.
* ``MultiheadAttention``: the q, k, v and output projections plus the two attention products
  (``N * L * S * E`` each; activation x activation, so never sparse and never int8).
* ``RNN``/``LSTM``/``GRU``: per layer and direction, ``steps * batch`` times each of its
  ``weight_ih``, ``weight_hh`` (and ``weight_hr``) matrices (gates included in their rows).
* ``Embedding``: 0 (a table lookup, no multiplications).

Activation x activation products inside other attention implementations (Hugging Face
attention modules, ``scaled_dot_product_attention``) are not counted: ``macs`` is the cost of
the weights, which is what compression changes.

With ``sparse=True`` a weight product counts only nonzero weights (what a sparse kernel would
do). Counts are for the whole ``example_input`` batch (a tensor, a tuple or a dict of tensors,
as the model is called): pass a batch of one for per-example cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from autocompress.compress._meta import quant_records
from autocompress.deploy._export import eval_mode
from autocompress.deploy._int8 import int8_eligible
from autocompress.tasks._batch import Inputs, call_model

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Product:
    """MACs of one product in one layer.

    ``weight`` is the parameter name (None for activation x activation products and lookups);
    ``kind`` is ``"linear"`` (a matrix product with a weight: Linear, attention projections),
    ``"conv"``, ``"attention"`` (activation x activation) or ``"lookup"`` (Embedding, 0 MACs).
    """

    layer: str
    weight: str | None
    macs: int
    kind: str = "linear"


def _count(w: torch.Tensor, sparse: bool) -> int:
    return int(torch.count_nonzero(w)) if sparse else w.numel()


def _mha(name: str, m: nn.MultiheadAttention, args: tuple, kwargs: dict, sparse: bool):
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    if q.dim() == 2:
        n, seq_q, seq_k = 1, q.shape[0], k.shape[0]
    elif m.batch_first:
        n, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
    else:
        n, seq_q, seq_k = q.shape[1], q.shape[0], k.shape[0]
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        w, p = m.in_proj_weight, f"{name}.in_proj_weight"
        parts = [(w[:e], p, seq_q), (w[e : 2 * e], p, seq_k), (w[2 * e :], p, seq_k)]
    else:
        parts = [
            (m.q_proj_weight, f"{name}.q_proj_weight", seq_q),
            (m.k_proj_weight, f"{name}.k_proj_weight", seq_k),
            (m.v_proj_weight, f"{name}.v_proj_weight", seq_k),
        ]
    out = [Product(name, p, n * seq * _count(w, sparse)) for w, p, seq in parts]
    out.append(Product(name, None, 2 * n * seq_q * seq_k * e, "attention"))
    w_out = m.out_proj.weight
    out.append(Product(name, f"{name}.out_proj.weight", n * seq_q * _count(w_out, sparse)))
    return out


def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` (a Linear with an ``(in, out)`` weight), without importing it."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _rnn(name: str, m: nn.RNNBase, inputs: tuple, sparse: bool) -> list[Product]:
    x = inputs[0]
    if isinstance(x, nn.utils.rnn.PackedSequence):
        positions = int(x.data.shape[0])  # every (step, sequence) pair actually run
    elif x.dim() == 2:
        positions = int(x.shape[0])  # unbatched (L, H_in)
    else:
        positions = int(x.shape[0] * x.shape[1])
    out = []
    for p, w in m.named_parameters(recurse=False):
        if p.startswith("weight_"):
            out.append(Product(name, f"{name}.{p}", positions * _count(w, sparse)))
    return out


def products(model: nn.Module, example_input: Inputs, sparse: bool = False) -> list[Product]:
    """Every weight (and attention) product of one forward pass on ``example_input``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> [(p.layer, p.macs) for p in products(net, torch.zeros(5, 4))]
        [('0', 60), ('2', 30)]
    """
    found: list[Product] = []
    hooks = []
    mha_prefixes = [
        n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    ]

    def linear_like(name: str):
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            w = mod.weight
            if isinstance(mod, _CONV_T):
                positions = inputs[0].numel() // mod.in_channels
            elif _is_conv1d(mod):
                positions = output.numel() // mod.nf
            else:
                positions = output.numel() // w.shape[0]
            kind = "linear" if isinstance(mod, nn.Linear) or _is_conv1d(mod) else "conv"
            found.append(Product(name, f"{name}.weight", positions * _count(w, sparse), kind))

        return hook

    def attention(name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            found.extend(_mha(name, mod, args, kwargs, sparse))

        return hook

    for name, m in model.named_modules():
        if any(name.startswith(p) for p in mha_prefixes):
            continue  # MHA reads its out_proj weight directly; counted by the MHA hook
        if isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(attention(name), with_kwargs=True))
        elif isinstance(m, (nn.Linear, *_CONV, *_CONV_T)) or _is_conv1d(m):
            hooks.append(m.register_forward_hook(linear_like(name)))
        elif isinstance(m, nn.RNNBase):
            hooks.append(
                m.register_forward_hook(
                    lambda mod, inputs, _, n=name: found.extend(_rnn(n, mod, inputs, sparse))
                )
            )
        elif isinstance(m, nn.Embedding):  # a lookup: listed with 0 MACs
            hooks.append(
                m.register_forward_hook(
                    lambda *_, n=name: found.append(Product(n, None, 0, "lookup"))
                )
            )
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return found


def macs(
    model: nn.Module,
    example_input: Inputs,
    *,
    sparse: bool = False,
) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (the whole batch).

    ``sparse=True`` counts only nonzero weights.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 10))
        >>> macs(net, torch.zeros(1, 64)) == 64 * 300 + 300 * 10
        True
    """
    return sum(p.macs for p in products(model, example_input, sparse))


def bitops(
    model: nn.Module,
    example_input: Inputs,
    *,
    sparse: bool = False,
    int8: bool = True,
) -> int:
    """Bit operations: MACs x weight bits x activation bits, summed over products.

    Weight bits come from ``quant_records(model)`` (32 for unrecorded weights). Activations are
    32-bit, or 8-bit when ``int8`` for Linear-type products with uniform <= 8-bit weights (exactly
    the products the int8 deployment form runs in int8; convolutions stay fp32 there).
    Attention products count 32 x 32.

    Example:
        >>> net = nn.Linear(8, 4)
        >>> bitops(net, torch.zeros(1, 8)) == 8 * 4 * 32 * 32
        True
    """
    records = quant_records(model)
    total = 0
    for p in products(model, example_input, sparse):
        rec = records.get(p.weight) if p.weight else None
        wbits = rec.bits if rec is not None else 32
        abits = 8 if int8 and p.kind == "linear" and int8_eligible(rec) else 32
        total += p.macs * wbits * abits
    return total
