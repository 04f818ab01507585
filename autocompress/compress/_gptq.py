"""GPTQ: uniform rounding that compensates each layer's error from calibration inputs.

Frantar, Ashkboos, Hoefler & Alistarh, *GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers* (ICLR 2023, arXiv:2210.17323). For a layer ``y = W x`` and calibration
inputs ``X``, GPTQ minimizes ``||W X - Q X||^2`` over the quantization grid: with the Hessian
``H = 2 X^T X`` (damped by :data:`DAMP` of its mean diagonal; the paper uses 1%) and the upper
Cholesky factor ``U`` of ``H^-1``, columns are quantized one at a time and each column's error
``(w - q) / U[j, j]`` is propagated to the columns not yet quantized (lazy batch updates over
blocks of 128 columns). By default (:data:`ACT_ORDER`) the columns go in decreasing ``diag(H)``
order (the paper's "act-order": most active inputs first) with *static* scales: per channel, or
per group of consecutive input weights, all from the weights before any update, so groups keep
the ONNX block layout. With ``act_order=False`` columns go in input order and a group's scale is
chosen from the updated weights when its first column is reached. Pruned weights (the mask of
the parametrization) stay exactly zero: they are "quantized" to 0, so their pruning error is
compensated by the columns after them, as SparseGPT does with a fixed mask (Frantar & Alistarh,
2023).

The grid is the engine's: symmetric codes in ``[-qmax, qmax]`` times fp16-exact scales, so
GPTQ's output is exactly what :func:`autocompress.compress._quant.bake` stores and the ONNX
``MatMulNBits``/``GatherBlockQuantized`` forms carry. ``calibrate`` runs it sequentially: layers
in the order the forward pass first calls them, each from the outputs of the layers already
quantized (layers reading the same input tensor, e.g. q/k/v, share one pass).

Layers it applies to: ``Linear``, Hugging Face ``Conv1D`` and ``Conv2d`` with ``groups == 1``
and zero padding (inputs unfolded to ``(in * kh * kw)``-wide rows). Other uniform weights
(embeddings: they have no input activations; grouped convolutions, RNN weights, tied tensors)
keep round-to-nearest, group-wise if the plan says so.

Why not a library: torchao 0.18's ``prototype.gptq`` asserts CUDA and produces its own
asymmetric (zero-point) int4 tensors for ``Linear`` only; llm-compressor's ``GPTQModifier`` and
GPTQModel drive whole Hugging Face LLMs through their own pipelines and packed formats and pin
their own torch. None takes an arbitrary ``nn.Module`` on the CPU with this grid and masks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from autocompress.compress._meta import fp16_exact
from autocompress.compress._quant import (
    _MIN_SCALE,
    UniformFakeQuant,
    _group_amax,
    _original,
    _parametrized,
    as_rows,
    clipped_scale,
    from_rows,
    qmax,
)
from autocompress.tasks._batch import Inputs, batch_len, call_model, take, to_device

CALIBRATION_SAMPLES = 256
"""Train examples GPTQ reads per plan (a few hundred is what the paper's accuracy needs)."""
DAMP = 0.1
"""Damping added to the Hessian's diagonal, as a fraction of its mean. The paper's 1% fits its
calibration sets of 128 x 2048 tokens; a few hundred sentences (~4k tokens) give a noisier
Hessian that more damping regularizes: on MiniLM's feed-forward input projections (4-bit,
group 128, 256 calibration sentences, alone) the val cosine drop is 0.0097 / 0.0100 / 0.0082 /
0.0082 / 0.0099 at damping 0.001 / 0.01 / 0.1 / 0.3 / 1 (with 1024 sentences: 0.0063 at 0.01,
0.0061 at 0.1)."""
BLOCK = 128
"""Columns per lazy batch update."""
ACT_ORDER = True
"""Quantize the most active input columns first (the paper's "act-order"), static groups."""
CLIP_BITS = 3
"""At this many bits and below, GPTQ's static scales are clipped to the least weight error
(``compress._quant.clipped_scale``, the reference implementation's ``mse`` option) instead of
``max|w| / qmax``. On MiniLM (val cosine drop, one layer role of all 6 blocks quantized alone,
group 128) clipping takes the value / attention-output projections at 3 bits from 0.018 /
0.020 to 0.011 / 0.012 (Q/K: 0.008 -> 0.009); at 4 bits it changes little either way."""


def gptq_rows(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group: int = 0,
    mask: torch.Tensor | None = None,
    *,
    damp: float = DAMP,
    block: int = BLOCK,
    act_order: bool = ACT_ORDER,
    clip: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight seen as rows ``(out, n)`` with input Hessian ``h`` ``(n, n)``.

    ``clip`` (default: ``bits <= CLIP_BITS``) clips the static scales to the least weight
    error (with ``act_order``; otherwise scales stay ``max|w| / qmax``).

    ``act_order`` quantizes the columns with the largest ``H`` diagonal (the most active
    inputs) first, with *static* groups (every group's scale from the weights before any
    update, so the groups stay consecutive in the input order, as the ONNX blocks need).

    Returns ``(values, scale)``: ``values = code * scale`` (codes in ``[-qmax, qmax]``, zero
    where ``mask`` is 0) and the fp16-exact scales, ``(out,)`` for ``group == 0`` else
    ``(out, ceil(n / group))``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(256, 32, generator=g) @ torch.randn(32, 32, generator=g)
        >>> w = torch.randn(8, 32, generator=g)
        >>> q, s = gptq_rows(w, x.T @ x, bits=3, group=16)
        >>> tuple(s.shape), bool(((q / s.repeat_interleave(16, 1)).abs() <= 3).all())
        ((8, 2), True)
    """
    out, n = w.shape
    dev = w.device
    wf = w.detach().double().clone()
    m = None if mask is None else mask.detach().to(dev, torch.float64)
    hh = h.detach().to(dev, torch.float64).clone()
    dead = torch.diag(hh) == 0
    hh[dead, dead] = 1.0  # inputs never seen: no error to propagate from or to them
    top = qmax(bits)
    clip = bits <= CLIP_BITS if clip is None else clip
    if act_order:
        return _act_order(wf, hh, m, bits, group, damp, block, clip)
    hinv = _inverse_cholesky(hh, damp)
    block = max(block, group)  # groups are powers of two: a block holds whole groups
    if group:
        scales = torch.zeros(out, math.ceil(n / group), dtype=torch.float64, device=dev)
        s = None
    else:
        kept = wf if m is None else wf * m
        s = fp16_exact((kept.abs().amax(dim=1) / top).clamp(min=_MIN_SCALE).float()).double()
        scales = s
    q_all = torch.zeros_like(wf)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1 = wf[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=wf.dtype, device=dev)
        hinv1 = hinv[i1:i2, i1:i2]
        m1 = None if m is None else m[:, i1:i2]
        with _one_thread():  # tiny ops: 40x faster without intra-op thread hand-offs
            _columns(w1, err1, q_all, scales, hinv1, m1, i1, top, group, s)
        wf[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all.float(), scales.float()


def _act_order(
    wf: torch.Tensor,
    hh: torch.Tensor,
    m: torch.Tensor | None,
    bits: int,
    group: int,
    damp: float,
    block: int,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ over the columns in decreasing ``diag(H)`` order, with static scales."""
    out, n = wf.shape
    top = qmax(bits)
    kept = (wf if m is None else wf * m).float()
    if clip:
        scales = clipped_scale(kept, bits, 0, group).double()
    else:
        amax = _group_amax(kept, group) if group else kept.abs().amax(dim=1)
        scales = fp16_exact((amax / top).clamp(min=_MIN_SCALE)).double()
    per_col = scales.repeat_interleave(group, dim=1)[:, :n] if group else scales[:, None]
    per_col = per_col.expand(out, n)
    perm = torch.argsort(torch.diag(hh), descending=True, stable=True)
    wf, per_col = wf[:, perm], per_col[:, perm]
    m = None if m is None else m[:, perm]
    hinv = _inverse_cholesky(hh[perm][:, perm], damp)
    q_all = torch.zeros_like(wf)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, err1 = wf[:, i1:i2].clone(), torch.zeros(out, i2 - i1, dtype=wf.dtype, device=wf.device)
        m1 = None if m is None else m[:, i1:i2]
        with _one_thread():
            _columns(w1, err1, q_all, scales, hinv[i1:i2, i1:i2], m1, i1, top, 0, None, per_col)
        wf[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all[:, torch.argsort(perm)].float(), scales.float()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _columns(
    w1: torch.Tensor,
    err1: torch.Tensor,
    q_all: torch.Tensor,
    scales: torch.Tensor,
    hinv1: torch.Tensor,
    m1: torch.Tensor | None,
    i1: int,
    top: int,
    group: int,
    s: torch.Tensor | None,
    per_col: torch.Tensor | None = None,
) -> None:
    """One block of columns, in order: quantize, propagate the error within the block.
    ``per_col`` gives every column's scales (static); else per-channel ``s``, or group scales
    chosen as each group is reached."""
    for i in range(w1.shape[1]):
        col = i1 + i
        if per_col is not None:
            s = per_col[:, col]
        if group and col % group == 0:  # this group's scale, from its updated weights
            cols = w1[:, i : i + group]
            cols = cols if m1 is None else cols * m1[:, i : i + group]
            amax = cols.abs().amax(dim=1)
            s = fp16_exact((amax / top).clamp(min=_MIN_SCALE).float()).double()
            scales[:, col // group] = s
        assert s is not None
        x = w1[:, i]
        q = torch.clamp(torch.round(x / s), -top, top) * s
        if m1 is not None:
            q = q * m1[:, i]
        q_all[:, col] = q
        e = (x - q) / hinv1[i, i]
        w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = e


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(h + damp * mean(diag) * I)^-1``, damping more if needed."""
    mean = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for k in range(6):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**k) * mean * eye)
        if int(info) == 0:
            # L^-T L^-1 by a triangular solve: torch's cholesky_inverse is ~7x slower on CPU
            li = torch.linalg.solve_triangular(lower, eye, upper=False)
            inv = li.T @ li
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise torch.linalg.LinAlgError("GPTQ: the calibration Hessian is not positive definite")


# --- the model-level pass ---------------------------------------------------------------------
def supported(module: nn.Module, attr: str) -> bool:
    """Whether GPTQ applies to ``module.<attr>`` (else the layer keeps round-to-nearest)."""
    if attr != "weight":
        return False
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _input_rows(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input as rows ``(N, n_in)`` matching :func:`as_rows` of its weight."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]  # padding positions are not inputs a sentence ever has
    return x.reshape(-1, x.shape[-1])


def calibration_inputs(task: Any, n: int = CALIBRATION_SAMPLES) -> list[Inputs]:
    """The first ``n`` examples of ``task``'s train split, in batches (never val/test)."""
    out, seen = [], 0
    for inputs, _ in task.batches("train"):
        k = min(batch_len(inputs), n - seen)
        out.append(inputs if k == batch_len(inputs) else take(inputs, k))
        seen += k
        if seen >= n:
            break
    return _by_length(out)


def _by_length(batches: list[Inputs]) -> list[Inputs]:
    """Padded token batches (dicts of ``(N, T)`` tensors with an ``attention_mask``) re-cut
    by sentence length, each batch trimmed to its longest sentence: the same tokens with far
    less padding to run through the model on every pass. Anything else is left as it is."""
    if not batches or not all(_paddable(b) for b in batches):
        return batches
    keys = list(batches[0])
    if any(list(b) != keys for b in batches):
        return batches
    width = max(int(b["attention_mask"].shape[1]) for b in batches)  # type: ignore[index]

    def padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]))

    rows = {k: torch.cat([padded(b[k]) for b in batches]) for k in keys}  # type: ignore[index]
    lengths = rows["attention_mask"].ne(0).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    size = max(batch_len(b) for b in batches)
    out: list[Inputs] = []
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        t = max(1, int(lengths[idx].max()))
        out.append({k: v[idx, :t].contiguous() for k, v in rows.items()})
    return out


def _paddable(b: Inputs) -> bool:
    """A dict of 2-D tensors of one width, right-padded by its ``attention_mask``."""
    if not isinstance(b, dict) or not isinstance(b.get("attention_mask"), torch.Tensor):
        return False
    m = b["attention_mask"]
    if m.dim() != 2 or not all(
        isinstance(v, torch.Tensor) and v.shape == m.shape for v in b.values()
    ):
        return False
    nz = m.ne(0)
    return bool((nz[:, 1:] <= nz[:, :-1]).all())  # real tokens first, then padding


def _mask_of(inputs: Inputs) -> torch.Tensor | None:
    if isinstance(inputs, dict):
        m = inputs.get("attention_mask")
        return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None
    return None


class _Stop(Exception):
    """Raised by a hook once every layer of a wave has seen its input: the rest of the
    forward pass is not needed."""


Target = tuple[UniformFakeQuant, nn.Module, str]


def _targets(model: nn.Module) -> dict[int, Target]:
    """GPTQ-able uniform weights by ``id`` of their module (untied, supported types)."""
    out: dict[int, Target] = {}
    for p, slots in _parametrized(model):
        unique = {id(m): (m, a) for _, m, a in slots}
        if isinstance(p, UniformFakeQuant) and len(unique) == 1:
            mod, attr = next(iter(unique.values()))
            if supported(mod, attr):
                out[id(mod)] = (p, mod, attr)
    return out


def _passes(
    model: nn.Module,
    batches: list[Inputs],
    device: torch.device,
    modules: list[nn.Module],
    hook: Any,
    stop_after: int | None = None,
) -> None:
    """Run ``batches`` through ``model`` (eval, no grad, weights computed once per pass) with
    ``hook(module, x, mask)`` before each of ``modules``; a batch stops early once
    ``stop_after`` hook calls have been made in it."""
    state: dict[str, Any] = {"mask": None, "calls": 0}

    def pre(mod: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        hook(mod, x, state["mask"])
        state["calls"] += 1
        if stop_after is not None and state["calls"] >= stop_after:
            raise _Stop

    handles = [m.register_forward_pre_hook(pre) for m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), parametrize.cached():
            for inputs in batches:
                inputs = to_device(inputs, device)
                state["mask"], state["calls"] = _mask_of(inputs), 0
                with contextlib.suppress(_Stop):
                    call_model(model, inputs)
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)


def calibrate(
    model: nn.Module, batches: Iterable[Inputs], device: str | torch.device = "cpu"
) -> int:
    """GPTQ every uniform layer of an attached ``model`` in place, sequentially; returns how
    many layers it quantized.

    Each layer's latent weight becomes GPTQ's ``code * scale`` values and its fake quant is
    pinned to GPTQ's scales (:meth:`UniformFakeQuant.fix_scale`), so ``bake`` stores exactly
    them and a fine-tune after it starts from them. Uniform weights GPTQ does not apply to
    (embeddings...) keep round-to-nearest on pinned clipped scales (:func:`_clip_others`).
    Masks must be final (``set_sparsity(1)``).
    """
    device = torch.device(device)
    batches = list(batches)
    targets = _targets(model)
    _clip_others(model, targets)
    if not targets or not batches:
        return 0
    waves, once = _waves(model, batches, targets, device)
    done = 0
    for wave in waves:
        hess: dict[int, torch.Tensor] = {}
        mods = [targets[k][1] for k in wave]
        _passes(model, batches, device, mods, _accumulate(hess), len(wave) if once else None)
        for k in wave:
            if k in hess:
                _quantize_layer(*targets[k], hess[k])
                done += 1
    return done


def _clip_others(model: nn.Module, targets: dict[int, Target]) -> None:
    """Pin clipped scales (``compress._quant.clipped_scale``) on the uniform weights GPTQ does
    not reach (embeddings, tied tensors, unsupported layers): without input activations to
    compensate from, the least weight error is the best rounding there is, and at 2-3 bits it
    is far below the ``max|w|`` grid's (a 3-bit group-64 word embedding of MiniLM: mean cosine
    0.990 -> 0.993)."""
    reached = {id(p) for p, _, _ in targets.values()}
    for p, slots in _parametrized(model):
        if not isinstance(p, UniformFakeQuant) or id(p) in reached or p.fixed is not None:
            continue
        with torch.no_grad():
            w = _original(slots).detach() * p.mask
        p.fix_scale(clipped_scale(w, p.bits, p.axis, p.group))


def _accumulate(hess: dict[int, torch.Tensor]) -> Any:
    """A hook adding each call's ``X^T X`` (float64) to ``hess[id(module)]``."""

    def add(mod: nn.Module, x: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        if x is None:
            return
        rows = _input_rows(mod, x.detach().float(), mask)
        xtx = (rows.T @ rows).double()  # fp32 products, summed over batches in fp64
        h = hess.get(id(mod))
        hess[id(mod)] = xtx if h is None else h.add_(xtx)

    return add


def _quantize_layer(p: UniformFakeQuant, mod: nn.Module, attr: str, h: torch.Tensor) -> None:
    orig = _original([("", mod, attr)])
    w = orig.detach()
    rows = as_rows(w, p.axis)
    mask_rows = as_rows(p.mask.to(w.device), p.axis)
    values, scale = gptq_rows(rows, h, p.bits, p.group, mask_rows)
    with torch.no_grad():
        orig.copy_(from_rows(values, w, p.axis))
    p.fix_scale(scale)


def _waves(
    model: nn.Module, batches: list[Inputs], targets: dict[int, Target], device: torch.device
) -> tuple[list[list[int]], bool]:
    """Target layers in the order the forward pass first calls them, grouped in waves: layers
    whose first call reads the very same input tensor (q/k/v) share one calibration pass.
    Also whether every target is called exactly once per forward (then a pass may stop once
    its wave has seen its inputs)."""
    order: list[int] = []
    first_input: dict[int, int] = {}
    calls: dict[int, int] = {}
    alive: list[torch.Tensor] = []  # held, so no two inputs of the pass share an id

    def see(mod: nn.Module, x: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        calls[id(mod)] = calls.get(id(mod), 0) + 1
        if id(mod) not in first_input:
            order.append(id(mod))
            first_input[id(mod)] = id(x) if x is not None else -len(order)
            if x is not None:
                alive.append(x)

    _passes(model, batches[:1], device, [t[1] for t in targets.values()], see)
    waves: list[list[int]] = []
    for k in order:
        if waves and first_input[waves[-1][0]] == first_input[k]:
            waves[-1].append(k)
        else:
            waves.append([k])
    return waves, all(c == 1 for c in calls.values())
