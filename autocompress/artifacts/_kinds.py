"""How one state-dict tensor becomes unsigned integer codes, and back (bit-exact).

Every kind maps the zero value to code 0, so the sparse encodings can skip zeros. Signed zeros
are stored as +0.0 (they compare equal and give the same outputs).

* ``u{b}``: fp32 with a uniform record (``q * scale[c]``); ``b``-bit codes; aux = the fp16
  scales, one per dim-0 channel. ``u{b}.{a}``: the same with the channels on dim ``a`` (HF
  ``Conv1D`` stores its weight ``(in, out)``: ``a = 1``); codes in the order of the tensor with
  dim ``a`` moved first. ``u{b}g{n}`` / ``u{b}.{a}g{n}``: group-wise scales, one per ``n``
  consecutive weights along the input dimension (``n`` in 16..256, a power of two); aux = the
  fp16 scales of shape ``(out, ceil(n_in / n))``, row-major (see ``compress._meta``).
* ``c{b}``: fp32 with a codebook record (``codebook[code]``); ``b``-bit codes; aux = the fp16
  codebook, ``2**b`` values.
* ``h16``: fp32 with an fp16 record; 16-bit fp16 patterns.
* ``f16``: fp32 without record whose values are all fp16-exact; 16-bit fp16 patterns.
* ``f32``: fp32 without record; 32-bit patterns.
* a dtype name (``int64``, ``float16``, ``bool``...): any other dtype, its own bit patterns.

Uniform codes are zigzag-mapped integers (``q >= 0 -> 2q``, ``q < 0 -> -2q - 1``), so ``q`` in
``[-(2**(b-1) - 1), 2**(b-1) - 1]`` fits ``b`` bits and ``q == 0`` is code 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

import numpy as np
import torch

from autocompress.compress._meta import GROUPS, QuantRecord
from autocompress.errors import ArtifactError

RAW_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_QUANT_RE = re.compile(r"^([uc])([1-9]|1[0-6])(?:\.([1-7]))?(?:g([1-9][0-9]{1,2}))?$")


@dataclass
class Coded:
    """A tensor as flat unsigned ``codes`` (0 == zero) of ``bits`` bits, plus ``aux`` bytes."""

    kind: str
    codes: np.ndarray
    bits: int
    aux: bytes


def uniform_layout(kind: str) -> tuple[int, int]:
    """``(axis, group)`` of a uniform kind (``u4`` -> (0, 0), ``u4.1g32`` -> (1, 32)).

    Example:
        >>> uniform_layout("u4.1g32"), uniform_layout("u8")
        ((1, 32), (0, 0))
    """
    m = _QUANT_RE.match(kind)
    if not m or m.group(1) != "u":
        raise ArtifactError(f"{kind!r} is not a uniform kind")
    return int(m.group(3) or 0), int(m.group(4) or 0)


def uniform_kind(bits: int, axis: int, group: int) -> str:
    """The kind name of uniform codes (inverse of :func:`uniform_layout`)."""
    return f"u{bits}" + (f".{axis}" if axis else "") + (f"g{group}" if group else "")


def kind_bits(kind: str) -> int | None:
    """Code width of ``kind``, or None for an unknown kind."""
    m = _QUANT_RE.match(kind)
    if m:
        if m.group(4) and (m.group(1) != "u" or int(m.group(4)) not in GROUPS):
            return None
        return int(m.group(2))
    if kind in ("h16", "f16"):
        return 16
    if kind == "f32":
        return 32
    if kind in RAW_DTYPES:
        dt = RAW_DTYPES[kind]
        return 1 if dt == torch.bool else dt.itemsize * 8
    return None


def aux_len(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of aux data of ``kind`` for a tensor of ``shape`` (fp16 scales or codebook)."""
    if kind.startswith("u"):
        axis, group = uniform_layout(kind)
        out = shape[axis] if axis < len(shape) else 0
        if not group:
            return 2 * out
        n_in = prod(shape) // out if out else 0
        return 2 * out * -(-n_in // group)
    if kind.startswith("c"):
        return 2 * (1 << int(kind[1:]))
    return 0


def _fp16_bytes(name: str, what: str, t: torch.Tensor) -> bytes:
    t = t.detach().cpu().float().reshape(-1)
    half = t.to(torch.float16)
    if not (torch.isfinite(t).all() and torch.equal(half.float(), t)):
        raise ArtifactError(
            f"the {what} of {name!r} is not finite fp16-exact: round it with "
            "autocompress.compress._meta.fp16_exact before export"
        )
    return half.numpy().astype("<f2").tobytes()


def _not_baked(name: str, why: str) -> ArtifactError:
    return ArtifactError(f"{name!r} {why}: export only models baked by autocompress.compress")


def _bit_patterns(t: torch.Tensor) -> np.ndarray:
    """Flat little-endian bit patterns of ``t`` (floats with -0.0 turned into +0.0)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.dtype in (torch.float32, torch.float64, torch.float16):
        bits = t.numpy().view(f"<u{t.element_size()}")
        negzero = 1 << (8 * t.element_size() - 1)
        if (bits == negzero).any():  # a compare instead of a copy: -0.0 is rare
            bits = np.where(bits == negzero, 0, bits).astype(bits.dtype)
        return bits
    if t.is_floating_point():
        t = t + 0.0
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy()
    return t.view(torch.uint8).numpy().view(f"<u{t.element_size()}")


def _fp16_exact_head(t: torch.Tensor) -> bool:
    head = t.detach().reshape(-1)[:4096]
    return torch.equal(head.half().float(), head)


def to_codes(name: str, t: torch.Tensor, rec: QuantRecord | None) -> Coded:
    """Codes of state-dict tensor ``t`` (named ``name``) under its quantization record ``rec``."""
    if rec is None:
        if t.dtype != torch.float32:
            kind = str(t.dtype).removeprefix("torch.")
            if kind not in RAW_DTYPES:
                raise ArtifactError(f"{name!r} has unsupported dtype {t.dtype}: cast it to float32")
            return Coded(kind, _bit_patterns(t), kind_bits(kind) or 0, b"")
        if _fp16_exact_head(t):  # a quick look first: random fp32 weights fail at once
            half = t.detach().to(torch.float16)
            if torch.equal(half.float(), t.detach()):
                return Coded("f16", _bit_patterns(half), 16, b"")
        return Coded("f32", _bit_patterns(t), 32, b"")
    if t.dtype != torch.float32:
        raise _not_baked(name, f"has dtype {t.dtype} but a quant record (expected float32)")
    bits, scheme = rec.bits, rec.scheme
    if scheme == "fp16":
        if bits != 16 or not torch.equal(t.detach().half().float(), t.detach()):
            raise _not_baked(name, "has an fp16 record but values that are not fp16-exact")
        return Coded("h16", _bit_patterns(t.detach().half()), 16, b"")
    group = getattr(rec, "group", 0)
    if group and group not in GROUPS:
        raise _not_baked(name, f"has group={group}; groups are 0 or one of {list(GROUPS)}")
    if scheme == "uniform" and 1 <= bits <= 16 and rec.scale is not None and t.dim() >= 1:
        return _uniform(name, t, bits, rec.scale, rec.axis, group)
    if scheme == "codebook" and 1 <= bits <= 16 and rec.codebook is not None:
        return _codebook(name, t, bits, rec.codebook)
    raise _not_baked(name, f"has an unsupported quant record (scheme={scheme!r}, bits={bits})")


def _rows(t: torch.Tensor, n0: int) -> torch.Tensor:
    """``t`` as ``(n0, rest)`` (works for empty tensors too)."""
    return t.reshape(n0, t.numel() // n0 if n0 else 0)


def _expand(s: np.ndarray, group: int, n_in: int) -> np.ndarray:
    """Per-channel ``(out,)`` scales as a column, or ``(out, groups)`` ones per weight."""
    return np.repeat(s, group, axis=1)[:, :n_in] if group else s[:, None]


def _uniform(
    name: str, t: torch.Tensor, bits: int, scale: torch.Tensor, axis: int = 0, group: int = 0
) -> Coded:
    if not 0 <= axis < max(1, t.dim()):
        raise _not_baked(name, f"has scales on dim {axis} of a {t.dim()}-D tensor")
    t = t.detach().cpu().movedim(axis, 0) if axis else t
    w = _rows(t.detach().cpu(), t.shape[0])
    n0, n_in = w.shape
    s = scale.detach().cpu().float()
    want = (n0, -(-n_in // group)) if group else (n0,)
    if s.numel() != prod(want) or (group and tuple(s.shape) != want):
        what = f"{want} group scales" if group else f"{n0} output channels"
        raise _not_baked(name, f"has {tuple(s.shape)} scales for {what}")
    s = s.reshape(want)
    aux = _fp16_bytes(name, "scale", s)
    # numpy float32 throughout: exact for |q| < 2**23 and far faster than torch on big tensors
    wn, sn = w.float().numpy(), _expand(s.numpy(), group, n_in)
    q = np.rint(wn / np.where(sn == 0, np.float32(1), sn))  # rint: half to even, like round
    q *= sn != 0
    qmax = (1 << (bits - 1)) - 1
    mag = np.abs(q)
    if not (np.array_equal(q * sn, wn) and (mag.size == 0 or mag.max() <= qmax)):
        raise _not_baked(name, f"holds values that are not q * scale with |q| <= {qmax}")
    mag *= 2
    mag -= q < 0  # zigzag: q >= 0 -> 2q, q < 0 -> -2q - 1
    return Coded(uniform_kind(bits, axis, group), mag.reshape(-1).astype(np.uint16), bits, aux)


def _codebook(name: str, t: torch.Tensor, bits: int, codebook: torch.Tensor) -> Coded:
    cb_t = codebook.detach().cpu().float().reshape(-1)
    if cb_t.numel() != 1 << bits or cb_t[0] != 0.0:
        raise _not_baked(name, f"needs a codebook of {1 << bits} values starting with 0.0")
    aux = _fp16_bytes(name, "codebook", cb_t)
    cb = cb_t.numpy()
    w = t.detach().cpu().reshape(-1).numpy()
    order = np.argsort(cb, kind="stable")
    idx = np.clip(np.searchsorted(cb[order], w), 0, cb.size - 1)
    codes = order[idx].astype(np.uint32)
    if not np.array_equal(cb[codes], w):
        raise _not_baked(name, "holds values that are not in its codebook")
    return Coded(f"c{bits}", codes, bits, aux)


def from_codes(
    kind: str, codes: np.ndarray, aux: bytes, shape: tuple[int, ...]
) -> tuple[torch.Tensor, QuantRecord | None]:
    """The tensor (and record) of :func:`to_codes` back from its codes."""
    bits = kind_bits(kind)
    if kind.startswith("u"):
        if codes.size and int(codes.max()) > (1 << bits) - 2:
            raise ArtifactError(f"uniform code {int(codes.max())} is out of range for {bits} bits")
        k = np.arange(1 << bits)
        table = np.where(k % 2 == 0, k // 2, -(k + 1) // 2).astype(np.float32)  # un-zigzag
        scale_np = np.frombuffer(aux, "<f2").astype(np.float32)
        q = table[codes]
        axis, group = uniform_layout(kind)
        if axis >= max(1, len(shape)):
            raise ArtifactError(f"kind {kind!r} names dim {axis} of a {len(shape)}-D tensor")
        moved = (shape[axis], *shape[:axis], *shape[axis + 1 :]) if shape else shape
        n0 = moved[0] if moved else 1
        n_in = q.size // n0 if n0 else 0
        want = (n0, -(-n_in // group)) if group else (n0,)
        if scale_np.size != prod(want):
            raise ArtifactError(f"{scale_np.size} uniform scales for {want} channels/groups")
        scale_np = scale_np.reshape(want)
        q.reshape(n0, n_in)[...] *= _expand(scale_np, group, n_in)
        w = torch.from_numpy(q).reshape(moved)
        if axis:
            w = w.movedim(0, axis).contiguous()
        scale = torch.from_numpy(scale_np)
        rec = QuantRecord(bits=bits, scheme="uniform", scale=scale, axis=axis, group=group)
        return w, rec
    if kind.startswith("c"):
        cb = torch.from_numpy(np.frombuffer(aux, "<f2").astype(np.float32))
        w = cb[torch.from_numpy(codes.astype(np.int64))].reshape(shape)
        return w, QuantRecord(bits=bits, scheme="codebook", codebook=cb)
    if kind in ("h16", "f16"):
        w = torch.from_numpy(codes.astype("<u2").view("<f2").astype(np.float32)).reshape(shape)
        return w, (QuantRecord(bits=16, scheme="fp16") if kind == "h16" else None)
    if kind == "f32":
        return torch.from_numpy(codes.astype("<u4", copy=False).view("<f4")).reshape(shape), None
    dtype = RAW_DTYPES[kind]
    if dtype == torch.bool:
        return torch.from_numpy(codes.astype(bool)).reshape(shape), None
    if codes.size == 0:
        return torch.empty(shape, dtype=dtype), None
    raw = bytearray(codes.astype(f"<u{dtype.itemsize}").tobytes())
    return torch.frombuffer(raw, dtype=dtype).reshape(shape), None
