"""The low-bit ONNX form: weights stored as the artifact's own codes, run by ONNX Runtime kernels.

The engine leaves every quantized weight *baked* (``code * scale`` or ``codebook[code]``, see
:mod:`autocompress.compress._meta`), so its integer codes are recovered exactly from the weight
and its :class:`~autocompress.compress.QuantRecord`: nothing is quantized again, and the ONNX
graph computes the same weights as the PyTorch model. Each graph weight that is a recorded
parameter (matched by value, so it works whichever exporter wrote the graph) is replaced by:

* ``MatMul``/``Gemm`` with a constant weight, uniform 2..4-bit record ->
  ``com.microsoft.MatMulNBits`` (ONNX Runtime's CPU kernel accepts 2, 4 and 8 bits: 3-bit codes
  are held in 4-bit slots; codes shifted to unsigned with the kernel's default zero point
  ``2**(bits-1)``). A group-wise record keeps its groups as blocks; a per-channel record
  repeats the channel's scale over the blocks of its row, with the block size chosen for the
  fewest bytes (codes with padding, plus fp16 scales; 16..256). 5..8-bit records -> int8 codes
  and scales decoded by ``Cast``/``Mul`` that ONNX Runtime folds into an fp32 weight at session
  start (exact, fp32 speed; its 8-bit ``MatMulNBits`` was 20x slower than fp32 at batch 1,
  see :data:`NBITS_MAX`). 2-bit (ternary) codes take the kernel's 2 bits, more than the
  artifact's entropy-coded ~1 bit: the kernel reads only its own layout.
* ``Gather`` on a constant table (an embedding), uniform 4- or 8-bit record ->
  ``com.microsoft.GatherBlockQuantized`` (quantized along the last axis; a per-row record is
  one block covering the row); 2, 3 and 5..7-bit records (which it would hold in 4- or 8-bit
  slots, up to 2x the artifact's bytes) -> codes packed densely, decoded into an fp32 table by
  standard operators ONNX Runtime folds at session start (:func:`_dense_decoded`; 3-bit groups
  of 32 on all-MiniLM-L6-v2: the form went from 1.34x to 1.19x the artifact). 3 and 5..7-bit
  codes take their own bits; 2-bit codes are ternary (-1, 0, 1), which the artifact
  entropy-codes to about 1 bit, so they are stored five a byte base 3 (1.6 bits, integer
  ``Div``/``Mod``) or, when that is smaller (mostly zeros, as trained tables are), as a nonzero
  bit per code and a sign bit per nonzero (``CumSum`` + ``Gather``): all-MiniLM-L6-v2 with
  Linear 4-bit g64 and a word embedding 2-bit g64 with 10% hot rows at 4 bits went from 1.31x
  (9.72 MB, the cold table at 2 bits) to 1.17x (8.67 MB) the artifact's 7.40 MB.
* Any other use of a recorded weight (convolutions, a weight the kernels refuse) ->
  ``DequantizeLinear`` of int8 codes with the per-channel scales, and codebook weights -> a
  ``Gather`` of the fp32 codebook on uint8 codes; both still stored at 1 byte per weight.

Scales are stored as fp16 (the engine's scales are fp16-exact; others stay fp32) behind a
``Cast`` that ONNX Runtime folds at session start, like the artifact stores them. Internal
tensor names are shortened (:func:`compact_names`).

Weights that cannot be converted stay fp32 and are named with the reason in the form's
metadata (``autocompress.lowbit``, a JSON ``{parameter: how}``) and in the log. The caller
(:func:`~autocompress.deploy.deploy_forms`) checks the form against the verified fp32 graph
before shipping it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from autocompress.compress._meta import QuantRecord, quant_records
from autocompress.deploy._export import set_form, set_meta

LOG = logging.getLogger("autocompress.deploy")
LOWBIT_KEY = "autocompress.lowbit"
MS_DOMAIN = "com.microsoft"
MIN_BLOCK, MAX_BLOCK = 16, 256
MAX_BLOCK_2BIT = 256  # ONNX Runtime 1.32: "2-bit MatMulNBits block_size must not exceed 256"
NBITS_MAX = 4
"""Widest codes run by ``MatMulNBits`` in the exact form; 5..8-bit Linear weights use
:func:`_decoded_int8`. ONNX Runtime 1.32's 8-bit ``MatMulNBits`` (exact, ``accuracy_level`` 0)
took 3.7-4.3 ms for one row through a 384x1536 weight against 0.2 ms for the fp32 MatMul on
this CPU (1 thread); 4-bit took 0.23-0.29 ms, and both matched fp32 at 1280 rows. With
``accuracy_level=4`` (int8 activations) the 8-bit kernel is fast: the ``lowbit_int8`` form
uses it (``nbits_max=8``)."""
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
"""``MatMulNBits`` ``accuracy_level`` values (ONNX Runtime's ``MLAS_QNBIT_GEMM_COMPUTE_TYPE``
clamp: 0 unset = fp32, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations quantized per block); on a
CPU kernel without a path for the level asked, ONNX Runtime falls back to fp32."""


@dataclass
class Coded:
    """A recorded weight as (out, in) rows with its exact integer codes.

    ``codes`` are signed uniform codes (``scale`` per row, or per ``group`` inputs) or codebook
    indices (``codebook`` set); ``rows`` the fp32 weight with the output channels first.
    """

    name: str
    rows: np.ndarray
    codes: np.ndarray
    bits: int
    scale: np.ndarray | None = None  # (out,) or (out, ceil(in / group))
    group: int = 0
    codebook: np.ndarray | None = None
    axis: int = 0
    shape: tuple[int, ...] = ()


@dataclass
class Conversion:
    """What the form did with each recorded weight: ``{parameter: how}``."""

    done: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    @property
    def summary(self) -> dict[str, str]:
        return {**self.done, **{k: f"fp32: {v}" for k, v in self.kept.items()}}


def _expand(scale: np.ndarray, group: int, n_in: int) -> np.ndarray:
    """Per-weight scales of (out, in) rows."""
    if scale.ndim == 1:
        return scale[:, None]
    return np.repeat(scale, group, axis=1)[:, :n_in]


def code_weight(name: str, w: np.ndarray, rec: QuantRecord) -> Coded | str:
    """The exact codes of ``w`` under ``rec``, or the reason they cannot be recovered.

    Example:
        >>> import torch
        >>> rec = QuantRecord(4, "uniform", scale=torch.tensor([0.5, 0.25]))
        >>> w = np.array([[1.0, -0.5], [0.25, 1.75]], np.float32)
        >>> code_weight("fc.weight", w, rec).codes.tolist()
        [[2, -1], [1, 7]]
        >>> code_weight("fc.weight", w + 0.1, rec)
        'its values are not code * scale of its record (is the model baked?)'
    """
    axis = int(getattr(rec, "axis", 0))
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float32)
    if rec.scheme == "uniform" and rec.scale is not None and rec.bits <= 8:
        group = int(getattr(rec, "group", 0) or 0)
        scale = rec.scale.detach().cpu().numpy().astype(np.float32)
        want = (rows.shape[0],) if not group else (rows.shape[0], -(-rows.shape[1] // group))
        if scale.shape != want:
            return f"scale shape {scale.shape} does not fit the weight (expected {want})"
        s = _expand(scale, group, rows.shape[1])
        safe = np.where(s == 0, 1.0, s).astype(np.float32)
        q = np.where(s == 0, 0.0, np.rint(rows / safe))
        qmax = 2 ** (rec.bits - 1) - 1
        if np.abs(q).max(initial=0) > qmax or not np.array_equal(
            (q.astype(np.float32) * s).astype(np.float32), rows
        ):
            return "its values are not code * scale of its record (is the model baked?)"
        c = Coded(name, rows, q.astype(np.int16), rec.bits, scale=scale, group=group)
    elif rec.scheme == "codebook" and rec.codebook is not None and rec.bits <= 8:
        book = rec.codebook.detach().cpu().numpy().astype(np.float32)
        order = np.argsort(book, kind="stable")
        pos = np.clip(np.searchsorted(book[order], rows), 0, len(book) - 1)
        idx = order[pos]
        if not np.array_equal(book[idx], rows):
            return "its values are not entries of its codebook"
        c = Coded(name, rows, idx.astype(np.int16), rec.bits, codebook=book)
    else:
        return f"{rec.scheme} {rec.bits}-bit weights have no low-bit ONNX form"
    c.axis, c.shape = axis, tuple(w.shape)
    return c


def coded_weights(model: nn.Module) -> tuple[dict[tuple[int, int], list[Coded]], Conversion]:
    """The recorded weights of ``model`` indexed by their (out, in) shape, and the ones that
    cannot be coded (with the reason)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    conv = Conversion()
    index: dict[tuple[int, int], list[Coded]] = defaultdict(list)
    seen: dict[int, Coded] = {}
    for name, rec in quant_records(model).items():
        p = params.get(name)
        if p is None or rec.scheme == "fp16":
            continue
        if id(p) in seen:  # a tied alias: one tensor, one entry
            continue
        c = code_weight(name, p.detach().cpu().numpy(), rec)
        if isinstance(c, str):
            conv.kept[name] = c
            continue
        seen[id(p)] = c
        index[c.rows.shape].append(c)
    return index, conv


def _match(a: np.ndarray, index: dict[tuple[int, int], list[Coded]]) -> Coded | None:
    """The coded weight whose (out, in) rows equal ``a`` (already oriented), if any."""
    for c in index.get(tuple(a.shape), ()):  # type: ignore[arg-type]
        if np.array_equal(c.rows, a):
            return c
    return None


def _pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (rows, n) packed little-endian along the last axis, ``8 // bits`` a byte."""
    per = 8 // bits
    u = u.reshape(u.shape[0], -1, per).astype(np.uint16)
    out = np.zeros(u.shape[:2], np.uint16)
    for i in range(per):
        out |= u[:, :, i] << (bits * i)
    return out.astype(np.uint8)


def _slot_bits(bits: int) -> int:
    return 2 if bits == 2 else (4 if bits <= 4 else 8)


def _nbits_block(c: Coded, slot: int) -> int | None:
    """MatMulNBits block size: the record's group, else the cheapest power of two."""
    cap = MAX_BLOCK_2BIT if slot == 2 else MAX_BLOCK
    if c.group:
        return c.group if MIN_BLOCK <= c.group <= max(cap, MAX_BLOCK) else None
    k = c.rows.shape[1]
    best, cost = None, None
    b = MIN_BLOCK
    while b <= cap:
        nb = -(-k // b)
        size = nb * b * slot / 8 + nb * 2  # fp16 scales
        if cost is None or size < cost:
            best, cost = b, size
        b *= 2
    return best


def _block_scales(c: Coded, block: int) -> np.ndarray:
    """Scales (out, n_blocks): the group scales, or each channel's scale repeated per block."""
    assert c.scale is not None
    nb = -(-c.rows.shape[1] // block)
    if c.scale.ndim == 2:
        return c.scale
    return np.repeat(c.scale[:, None], nb, axis=1)


class _Graph:
    """Mutable view of an ONNX graph: new initializers and nodes, unique names."""

    def __init__(
        self,
        proto: onnx.ModelProto,
        accuracy_level: int = 0,
        nbits_max: int = NBITS_MAX,
        token8: bool = False,
    ) -> None:
        self.proto = proto
        self.token8 = token8
        self.token_inputs: dict[str, tuple[str, ...]] = {}
        self.accuracy_level = accuracy_level
        self.nbits_max = nbits_max
        self.g = proto.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.names = set(self.inits) | {o for n in self.g.node for o in n.output}
        self.names |= {i.name for i in self.g.input}

    def fresh(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, base: str, a: np.ndarray) -> str:
        name = self.fresh(base)
        self.g.initializer.append(numpy_helper.from_array(a, name))
        return name

    def scales(self, base: str, a: np.ndarray, nodes: list[onnx.NodeProto]) -> str:
        """fp32 scales ``a``, stored as fp16 when that is exact (the engine's scales are)
        behind a ``Cast`` appended to ``nodes`` (folded by ONNX Runtime at session start)."""
        a = a.astype(np.float32)
        half = a.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), a):
            return self.const(base, a)
        name = self.fresh(f"{base}_f32")
        nodes.append(
            helper.make_node(
                "Cast", [self.const(f"{base}_f16", half)], [name], to=onnx.TensorProto.FLOAT
            )
        )
        return name

    def drop_unused(self) -> None:
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        keep = [i for i in self.g.initializer if i.name in used]
        del self.g.initializer[:]
        self.g.initializer.extend(keep)


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == onnx.AttributeProto.FLOAT else a.i
    return default


def _decoded_int8(gr: _Graph, c: Coded, a_in: str, out: str, tag: str):
    """``MatMul`` on ``Cast(int8 codes) * scales``: ONNX Runtime folds the decode into an fp32
    weight when the session starts, so the file holds 1 byte per weight and the product runs at
    fp32 speed, exactly (a ``DequantizeLinear`` there is fused into a dynamically quantized
    MatMul by ONNX Runtime's QDQ optimizer: not exact)."""
    assert c.scale is not None
    n, k = c.rows.shape
    nodes = []
    qf, w = gr.fresh(f"{tag}_qf"), gr.fresh(f"{tag}_w")
    if not c.group:
        q = gr.const(f"{tag}_q8", np.ascontiguousarray(c.codes.astype(np.int8).T))  # (in, out)
        s = gr.scales(f"{tag}_scale", c.scale, nodes)
        nodes.append(helper.make_node("Cast", [q], [qf], to=onnx.TensorProto.FLOAT))
        nodes.append(helper.make_node("Mul", [qf, s], [w]))
    else:
        g, nb = c.group, c.scale.shape[1]
        codes = np.zeros((n, nb * g), np.int8)
        codes[:, :k] = c.codes
        q = gr.const(f"{tag}_q8", codes.reshape(n, nb, g))
        s = gr.scales(f"{tag}_scale", c.scale[:, :, None], nodes)
        shape = gr.const(f"{tag}_shape", np.array([n, nb * g], np.int64))
        start, stop = (
            gr.const(f"{tag}_k0", np.array([0], np.int64)),
            gr.const(f"{tag}_k1", np.array([k], np.int64)),
        )
        axes = gr.const(f"{tag}_ax", np.array([1], np.int64))
        m, r, sl = gr.fresh(f"{tag}_m"), gr.fresh(f"{tag}_r"), gr.fresh(f"{tag}_sl")
        nodes.append(helper.make_node("Cast", [q], [qf], to=onnx.TensorProto.FLOAT))
        nodes.append(helper.make_node("Mul", [qf, s], [m]))
        nodes.append(helper.make_node("Reshape", [m, shape], [r]))
        nodes.append(helper.make_node("Slice", [r, start, stop, axes], [sl]))
        nodes.append(helper.make_node("Transpose", [sl], [w], perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", [a_in, w], [out]))
    how = f"MatMul on int8 codes decoded at load ({c.bits}-bit" + (
        f", group {c.group})" if c.group else ")"
    )
    return nodes, how


def _matmul_nbits(gr: _Graph, c: Coded, a_in: str, out: str, tag: str):
    slot = _slot_bits(c.bits)
    if slot > gr.nbits_max:
        return _decoded_int8(gr, c, a_in, out, tag)
    block = _nbits_block(c, slot)
    if block is None:
        raise _Refused(f"group {c.group} is not a block size MatMulNBits accepts")
    n, k = c.rows.shape
    nb = -(-k // block)
    zp = 2 ** (slot - 1)
    u = np.full((n, nb * block), zp, np.uint8)
    u[:, :k] = (c.codes + zp).astype(np.uint8)
    packed = _pack(u, slot).reshape(n, nb, block * slot // 8)
    b = gr.const(f"{tag}_q{slot}", packed)
    nodes: list[onnx.NodeProto] = []
    s = gr.scales(f"{tag}_scales", _block_scales(c, block).reshape(-1), nodes)
    node = helper.make_node(
        "MatMulNBits",
        [a_in, b, s],
        [out],
        name=gr.fresh(f"{tag}_MatMulNBits"),
        domain=MS_DOMAIN,
        K=k,
        N=n,
        bits=slot,
        block_size=block,
        **({"accuracy_level": gr.accuracy_level} if gr.accuracy_level else {}),
    )
    how = f"MatMulNBits {slot}-bit, block {block}" + (f" (group {c.group})" if c.group else "")
    if gr.accuracy_level:
        how += f", accuracy_level {gr.accuracy_level}"
    return [*nodes, node], how


def _gather_bq(gr: _Graph, c: Coded, idx: str, out: str, tag: str):
    assert c.scale is not None
    v, d = c.rows.shape
    slot = 4 if c.bits <= 4 and d % 2 == 0 else 8
    if c.group:
        block = c.group
    else:
        block = MIN_BLOCK
        while block < d:
            block *= 2
    zp = 2 ** (slot - 1)
    u = (c.codes + zp).astype(np.uint8)
    data = gr.const(f"{tag}_q{slot}", _pack(u, 4) if slot == 4 else u)
    scales = c.scale if c.scale.ndim == 2 else c.scale[:, None]
    nodes: list[onnx.NodeProto] = []
    s = gr.scales(f"{tag}_scales", scales, nodes)
    node = helper.make_node(
        "GatherBlockQuantized",
        [data, idx, s],
        [out],
        name=gr.fresh(f"{tag}_GatherBlockQuantized"),
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=1,
        block_size=block,
        bits=slot,
    )
    how = f"GatherBlockQuantized {slot}-bit, block {block}" + (
        f" (group {c.group})" if c.group else ""
    )
    return [*nodes, node], how


def _dense_table(c: Coded) -> bool:
    """An embedding whose codes ``GatherBlockQuantized`` would hold in wider slots (2, 3, 5..7
    bits in 4- or 8-bit slots: up to 2x the artifact's bytes), with scales the dense decoding
    can expand (one per row, or groups dividing the row)."""
    if c.scale is None or c.bits in (4, 8) or c.bits > 8:
        return False
    return not c.group or c.rows.shape[1] % c.group == 0


TERNARY_PER_BYTE = 5
"""2-bit codes are ternary (-1, 0, 1: the symmetric grid's ``qmax`` is 1), so five fit a byte
base 3 (``3**5 = 243``): 1.6 bits a code instead of 2 (the artifact entropy-codes them to about
1.5)."""


def pack_ternary(u: np.ndarray) -> np.ndarray:
    """Unsigned ternary codes (0, 1, 2; any shape) packed base 3, little-endian digits, five a
    byte: byte ``j`` is ``sum(u[5j + i] * 3**i)``; the last byte is padded with zeros.

    Example:
        >>> pack_ternary(np.array([2, 0, 1, 0, 0, 1, 2], np.uint8)).tolist()
        [11, 7]
    """
    flat = u.reshape(-1).astype(np.int32)
    if flat.size and (flat.min() < 0 or flat.max() > 2):
        raise ValueError("ternary codes must be 0, 1 or 2")
    pad = -flat.size % TERNARY_PER_BYTE
    digits = np.concatenate([flat, np.zeros(pad, np.int32)]).reshape(-1, TERNARY_PER_BYTE)
    return (digits @ (3 ** np.arange(TERNARY_PER_BYTE, dtype=np.int32))).astype(np.uint8)


def _bit_codes(gr: _Graph, c: Coded, tag: str, nodes: list[onnx.NodeProto]) -> str:
    """Nodes computing the signed codes as fp32 ``(v*d, 1)`` from a little-endian bit stream of
    ``bits`` per code, each shifted by ``2**(bits-1)``."""
    v, d = c.rows.shape
    b, zp = c.bits, 2 ** (c.bits - 1)
    u = (c.codes.reshape(-1) + zp).astype(np.uint8)
    bits = ((u[:, None] >> np.arange(b, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = np.packbits(bits.reshape(-1), bitorder="little")
    k = {
        "p": gr.const(f"{tag}_packed{b}", packed[:, None]),
        "sh": gr.const(f"{tag}_shifts", np.arange(8, dtype=np.uint8)),
        "one": gr.const(f"{tag}_one", np.array(1, np.uint8)),
        "flat": gr.const(f"{tag}_flat", np.array([-1], np.int64)),
        "n0": gr.const(f"{tag}_n0", np.array([0], np.int64)),
        "n1": gr.const(f"{tag}_n1", np.array([v * d * b], np.int64)),
        "nb": gr.const(f"{tag}_nb", np.array([v * d, b], np.int64)),
        "pw": gr.const(f"{tag}_pow", (2.0 ** np.arange(b, dtype=np.float32))[:, None]),
        "zp": gr.const(f"{tag}_zp", np.array(float(zp), np.float32)),
    }
    t = {n: gr.fresh(f"{tag}_{n}") for n in ("sh", "bit", "fl", "sl", "rs", "bf", "u", "c")}
    nodes += [
        helper.make_node("BitShift", [k["p"], k["sh"]], [t["sh"]], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [t["sh"], k["one"]], [t["bit"]]),
        helper.make_node("Reshape", [t["bit"], k["flat"]], [t["fl"]]),
        helper.make_node("Slice", [t["fl"], k["n0"], k["n1"]], [t["sl"]]),
        helper.make_node("Reshape", [t["sl"], k["nb"]], [t["rs"]]),
        helper.make_node("Cast", [t["rs"]], [t["bf"]], to=onnx.TensorProto.FLOAT),
        helper.make_node("MatMul", [t["bf"], k["pw"]], [t["u"]]),  # (v*d, 1) unsigned codes
        helper.make_node("Sub", [t["u"], k["zp"]], [t["c"]]),
    ]
    return t["c"]


def _ternary_codes(gr: _Graph, c: Coded, tag: str, nodes: list[onnx.NodeProto]) -> str:
    """Nodes computing the signed 2-bit codes as fp32 ``(v*d,)`` from bytes of five base-3
    digits (:func:`pack_ternary` of the codes + 1): ``(byte // 3**i) % 3 - 1`` in int32
    ``Div``/``Mod`` (exact integer arithmetic; no lookup table to store)."""
    v, d = c.rows.shape
    packed = pack_ternary((c.codes.reshape(-1) + 1).astype(np.uint8))
    k = {
        "p": gr.const(f"{tag}_packed3", packed[:, None]),
        "pw": gr.const(f"{tag}_pow3", 3 ** np.arange(TERNARY_PER_BYTE, dtype=np.int32)),
        "three": gr.const(f"{tag}_three", np.array(3, np.int32)),
        "flat": gr.const(f"{tag}_flat", np.array([-1], np.int64)),
        "n0": gr.const(f"{tag}_n0", np.array([0], np.int64)),
        "n1": gr.const(f"{tag}_n1", np.array([v * d], np.int64)),
        "one": gr.const(f"{tag}_one", np.array(1.0, np.float32)),
    }
    t = {n: gr.fresh(f"{tag}_{n}") for n in ("i", "q", "u", "fl", "sl", "f", "c")}
    nodes += [
        helper.make_node("Cast", [k["p"]], [t["i"]], to=onnx.TensorProto.INT32),
        helper.make_node("Div", [t["i"], k["pw"]], [t["q"]]),  # (bytes, 5)
        helper.make_node("Mod", [t["q"], k["three"]], [t["u"]]),  # digits 0..2
        helper.make_node("Reshape", [t["u"], k["flat"]], [t["fl"]]),
        helper.make_node("Slice", [t["fl"], k["n0"], k["n1"]], [t["sl"]]),
        helper.make_node("Cast", [t["sl"]], [t["f"]], to=onnx.TensorProto.FLOAT),
        helper.make_node("Sub", [t["f"], k["one"]], [t["c"]]),
    ]
    return t["c"]


def _unpacked_bits(
    gr: _Graph, bits: np.ndarray, tag: str, nodes: list[onnx.NodeProto], n: int | None = None
) -> str:
    """Nodes unpacking the 0/1 vector ``bits`` (stored ``np.packbits`` little-endian) into a
    uint8 vector: its first ``n`` entries, or all of the padded bytes' bits."""
    packed = np.packbits(bits.astype(np.uint8), bitorder="little")
    p = gr.const(f"{tag}_bits", packed[:, None])
    sh = gr.const(f"{tag}_shifts", np.arange(8, dtype=np.uint8))
    one = gr.const(f"{tag}_one", np.array(1, np.uint8))
    flat = gr.const(f"{tag}_flat", np.array([-1], np.int64))
    t = {x: gr.fresh(f"{tag}_{x}") for x in ("sh", "bit", "fl", "sl")}
    nodes += [
        helper.make_node("BitShift", [p, sh], [t["sh"]], direction="RIGHT"),
        helper.make_node("BitwiseAnd", [t["sh"], one], [t["bit"]]),
        helper.make_node("Reshape", [t["bit"], flat], [t["fl"]]),
    ]
    if n is None:
        return t["fl"]
    n0 = gr.const(f"{tag}_n0", np.array([0], np.int64))
    n1 = gr.const(f"{tag}_n1", np.array([n], np.int64))
    nodes.append(helper.make_node("Slice", [t["fl"], n0, n1], [t["sl"]]))
    return t["sl"]


def _mask_sign_codes(gr: _Graph, c: Coded, tag: str, nodes: list[onnx.NodeProto]) -> str:
    """Nodes computing the signed 2-bit codes as fp32 ``(v*d,)`` from one bit per code
    (nonzero) and one sign bit per nonzero code (1: +1), with one padding sign bit so that the
    exclusive ``CumSum`` of the nonzero bits (each code's position among the nonzeros) indexes
    the signs for every code: ``code = nz * (2 * signs[cumsum] - 1)``, exact in int32/fp32."""
    flat = c.codes.reshape(-1)
    nz = flat != 0
    signs = np.concatenate([flat[nz] > 0, np.zeros(1, bool)])
    m = _unpacked_bits(gr, nz, f"{tag}_nz", nodes, n=flat.size)
    sg = _unpacked_bits(gr, signs, f"{tag}_sign", nodes)
    axis = gr.const(f"{tag}_axis", np.array(0, np.int32))
    two = gr.const(f"{tag}_two", np.array(2.0, np.float32))
    t = {x: gr.fresh(f"{tag}_{x}") for x in ("mi", "pos", "s", "mf", "sf", "s2", "p", "c")}
    nodes += [
        helper.make_node("Cast", [m], [t["mi"]], to=onnx.TensorProto.INT32),
        helper.make_node("CumSum", [t["mi"], axis], [t["pos"]], exclusive=1),
        helper.make_node("Gather", [sg, t["pos"]], [t["s"]], axis=0),
        helper.make_node("Cast", [m], [t["mf"]], to=onnx.TensorProto.FLOAT),
        helper.make_node("Cast", [t["s"]], [t["sf"]], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", [t["sf"], two], [t["s2"]]),  # 0 or 2
        helper.make_node("Mul", [t["s2"], t["mf"]], [t["p"]]),
        helper.make_node("Sub", [t["p"], t["mf"]], [t["c"]]),  # nz * (2 sign - 1)
    ]
    return t["c"]


def ternary_bytes(codes: np.ndarray) -> dict[str, int]:
    """Bytes of the two packings of 2-bit (ternary) codes: ``"base3"`` (five a byte) and
    ``"mask"`` (a nonzero bit per code + a sign bit per nonzero, one padding bit). Trained
    tables are mostly zeros at 2 bits (all-MiniLM-L6-v2's cold word rows: 79% zeros, 1.2 bits a
    code against base 3's 1.6), so the smaller one is stored.

    Example:
        >>> ternary_bytes(np.array([0, 0, 1, 0, -1, 0, 0, 0, 0, 0]))
        {'base3': 2, 'mask': 3}
    """
    n, nnz = codes.size, int(np.count_nonzero(codes))
    return {"base3": -(-n // TERNARY_PER_BYTE), "mask": -(-n // 8) + -(-(nnz + 1) // 8)}


def _dense_decoded(gr: _Graph, c: Coded, out: str, tag: str):
    """Nodes computing the fp32 table ``out`` (rows) from its densely packed codes times the
    scales: 2-bit (ternary) codes five a byte base 3 (:func:`_ternary_codes`), others ``bits``
    per code in a little-endian bit stream (:func:`_bit_codes`). All inputs are constants, so
    ONNX Runtime folds the decoding into an fp32 table when the session starts: the file holds
    about the artifact's bits, the Gather runs at fp32 speed, exactly."""
    assert c.scale is not None
    v, d = c.rows.shape
    nodes: list[onnx.NodeProto] = []
    notes = []
    if c.bits == 2:
        sizes = ternary_bytes(c.codes)
        if sizes["mask"] < sizes["base3"]:
            codes, notes = _mask_sign_codes(gr, c, tag, nodes), ["nonzero and sign bits"]
        else:
            codes, notes = _ternary_codes(gr, c, tag, nodes), ["base 3, 5 a byte"]
    else:
        codes = _bit_codes(gr, c, tag, nodes)
    if c.group:
        g = c.group
        shape = gr.const(f"{tag}_vng", np.array([v, d // g, g], np.int64))
        s = gr.scales(f"{tag}_scale", c.scale[:, :, None], nodes)
    else:
        shape = gr.const(f"{tag}_vd", np.array([v, d], np.int64))
        s = gr.scales(f"{tag}_scale", c.scale[:, None], nodes)
    r, m = gr.fresh(f"{tag}_r"), gr.fresh(f"{tag}_m")
    final = gr.const(f"{tag}_shape", np.array([v, d], np.int64))
    nodes += [
        helper.make_node("Reshape", [codes, shape], [r]),
        helper.make_node("Mul", [r, s], [m]),
        helper.make_node("Reshape", [m, final], [out]),
    ]
    notes += [f"group {c.group}"] if c.group else []
    how = f"Gather of a table decoded at load from {c.bits}-bit packed codes" + (
        f" ({', '.join(notes)})" if notes else ""
    )
    return nodes, how


def _dequantized(gr: _Graph, c: Coded, layout: str | tuple[int, ...], out: str, tag: str):
    """Nodes computing the fp32 weight from 1-byte codes, in its graph ``layout``: ``"rows"``
    (out, in), ``"t"`` (in, out: a MatMul's), or a shape the rows reshape to (a convolution's)."""

    def arrange(a: np.ndarray) -> np.ndarray:
        if layout == "t":
            a = a.T
        elif layout != "rows":
            a = a.reshape(layout)
        return np.ascontiguousarray(a)

    nodes = []
    if c.codebook is not None:
        ci = gr.const(f"{tag}_codes", arrange(c.codes.astype(np.uint8)))
        book = gr.const(f"{tag}_codebook", c.codebook.astype(np.float32))
        cast = gr.fresh(f"{tag}_codes_i32")
        nodes.append(helper.make_node("Cast", [ci], [cast], to=onnx.TensorProto.INT32))
        nodes.append(helper.make_node("Gather", [book, cast], [out], axis=0))
        return nodes, f"codebook {c.bits}-bit: Gather of the codebook on uint8 codes"
    if c.group or c.scale is None:
        raise _Refused("a group-wise weight outside MatMul/Gather has no DequantizeLinear form")
    q = gr.const(f"{tag}_q8", arrange(c.codes.astype(np.int8)))
    s = gr.const(f"{tag}_scale", c.scale.astype(np.float32))
    axis = 1 if layout == "t" else 0
    nodes.append(helper.make_node("DequantizeLinear", [q, s], [out], axis=axis))
    return nodes, f"DequantizeLinear of int8 codes ({c.bits}-bit)"


class _Refused(Exception):
    """This weight has no native form here (the reason is the message)."""

    coded: str = ""


def lowbit_form(
    proto: onnx.ModelProto,
    model: nn.Module,
    *,
    accuracy_level: int = 0,
    nbits_max: int = NBITS_MAX,
    token8: bool = False,
) -> tuple[onnx.ModelProto | None, Conversion]:
    """``proto`` with every recorded weight stored as its codes (see the module docstring).

    ``proto`` is an ONNX graph of ``model`` (its fp32 export, or the int8 form, whose Gathers
    and remaining fp32 weights are converted); it is modified in place and returned, or None
    when no weight was converted.

    ``accuracy_level`` is ``MatMulNBits``' attribute: 0 (default) computes in fp32 from the
    exact weights; 4 quantizes the activations to int8 per block at run time and uses ONNX
    Runtime's int8 dot-product kernels (:data:`ACCURACY_LEVELS`; faster, not exact: the
    ``lowbit_int8`` form). ``nbits_max``: the widest codes run by ``MatMulNBits`` (4, or 8 to
    run 5..8-bit Linear weights through its 8-bit kernel, which is only fast with
    ``accuracy_level=4``); wider ones are decoded at load (:func:`_decoded_int8`). ``token8``:
    uniform per-channel Linear weights run as int8 ``MatMulInteger`` on activations quantized
    to uint8 per token (:mod:`autocompress.deploy._token8`; the ``int8_token`` form, not exact).

    Example:
        >>> import torch
        >>> from autocompress.compress import apply
        >>> from autocompress.deploy import export_fp32
        >>> from autocompress.spaces import Plan
        >>> _ = torch.manual_seed(0)
        >>> q = apply(torch.nn.Sequential(torch.nn.Linear(64, 32)), Plan.uniform(["0"], bits=4))
        >>> form, conv = lowbit_form(export_fp32(q, torch.randn(2, 64)), q)
        >>> conv.done
        {'0.weight': 'MatMulNBits 4-bit, block 64'}
    """
    if accuracy_level not in ACCURACY_LEVELS:
        raise ValueError(f"accuracy_level={accuracy_level!r}: use one of {list(ACCURACY_LEVELS)}")
    if nbits_max not in (4, 8):
        raise ValueError(f"nbits_max={nbits_max!r}: use 4 or 8")
    index, conv = coded_weights(model)
    if not index:
        return None, conv
    gr = _Graph(proto, accuracy_level, nbits_max, token8)
    new_nodes: list[onnx.NodeProto] = []
    for node in list(gr.g.node):
        made = None
        try:
            made = _convert(gr, node, index, conv)
        except _Refused as e:
            conv.kept[e.coded] = str(e)
        new_nodes.extend(made if made is not None else [node])
    for c in (c for cs in index.values() for c in cs):
        if c.name not in conv.done and c.name not in conv.kept:
            conv.kept[c.name] = "not found as a constant weight of the graph"
    if not conv.done:
        return None, conv
    del gr.g.node[:]
    gr.g.node.extend(new_nodes)
    gr.drop_unused()
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    set_meta(proto, {LOWBIT_KEY: json.dumps(conv.summary, sort_keys=True)})
    return set_form(compact_names(proto), "lowbit"), conv


def compact_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Short hexadecimal names for every internal tensor, no node names, no value_info.

    The graph's inputs and outputs keep their names. On a small model the exporter's names
    (``/bert/encoder/layer.0/attention/self/Reshape_output_0``) are most of the file: on a
    2-layer, 64-wide BERT they were 50 KB of a 116 KB low-bit form.
    """
    g = proto.graph
    sub = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if any(a.type in sub for n in g.node for a in n.attribute):
        return proto  # subgraphs read outer names: leave them all
    keep = {i.name for i in g.input} | {o.name for o in g.output}
    names: dict[str, str] = {}

    def short(n: str) -> str:
        if not n or n in keep:
            return n
        if n not in names:
            names[n] = format(len(names), "x")
        return names[n]

    for i in g.initializer:
        i.name = short(i.name)
    for node in g.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del g.value_info[:]
    return proto


def _refuse(c: Coded, why: str) -> _Refused:
    e = _Refused(why)
    e.coded = c.name
    return e


def _convert(
    gr: _Graph, node: onnx.NodeProto, index: dict[tuple[int, int], list[Coded]], conv: Conversion
) -> list[onnx.NodeProto] | None:
    """The nodes replacing ``node`` (None: keep it), recording what was done in ``conv``."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    tag = (node.name or f"{op}_{node.output[0]}").replace("/", "_").strip("_")
    if op == "Gather" and node.input[0] in gr.inits:
        a = numpy_helper.to_array(gr.inits[node.input[0]])
        c = _match(a, index) if a.ndim == 2 and _attr(node, "axis", 0) == 0 else None
        if c is None:
            return None
        if c.codebook is None and _dense_table(c):
            w = gr.fresh(f"{tag}_weight")
            nodes, how = _dense_decoded(gr, c, w, tag)
            nodes.append(helper.make_node("Gather", [w, node.input[1]], [node.output[0]], axis=0))
        elif c.codebook is None:
            nodes, how = _gather_bq(gr, c, node.input[1], node.output[0], tag)
        else:
            w = gr.fresh(f"{tag}_weight")
            nodes, how = _dequantized(gr, c, "rows", w, tag)
            nodes.append(helper.make_node("Gather", [w, node.input[1]], [node.output[0]], axis=0))
    elif op in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in gr.inits:
        a = numpy_helper.to_array(gr.inits[node.input[1]])
        if a.ndim != 2:
            return None
        trans_b = op == "Gemm" and _attr(node, "transB", 0) == 1
        c = _match(a if trans_b else a.T, index)  # rows are (out, in)
        if c is None:
            return None
        if op == "Gemm" and (
            _attr(node, "alpha", 1.0) != 1.0
            or _attr(node, "beta", 1.0) != 1.0
            or _attr(node, "transA", 0) != 0
        ):
            raise _refuse(c, "a Gemm with alpha, beta or transA is left as it is")
        bias = node.input[2] if op == "Gemm" and len(node.input) > 2 else ""
        out = gr.fresh(f"{tag}_mm") if bias else node.output[0]
        from autocompress.deploy._token8 import matmul_token8, token8_eligible

        if gr.token8 and token8_eligible(c):
            nodes, how = matmul_token8(gr, c, node.input[0], out, tag)
        elif c.codebook is None:
            try:
                nodes, how = _matmul_nbits(gr, c, node.input[0], out, tag)
            except _Refused as e:
                raise _refuse(c, str(e)) from None
        else:
            w = gr.fresh(f"{tag}_weight")
            nodes, how = _dequantized(gr, c, "t", w, tag)
            nodes.append(helper.make_node("MatMul", [node.input[0], w], [out]))
        if bias:
            nodes.append(helper.make_node("Add", [out, bias], [node.output[0]]))
    elif op == "Conv" and len(node.input) >= 2 and node.input[1] in gr.inits:
        a = numpy_helper.to_array(gr.inits[node.input[1]])
        c = _match(a.reshape(a.shape[0], -1), index) if a.ndim >= 3 else None
        if c is None:
            return None
        w = gr.fresh(f"{tag}_weight")
        try:
            nodes, how = _dequantized(gr, c, tuple(a.shape), w, tag)
        except _Refused as e:
            raise _refuse(c, str(e)) from None
        conv_node = onnx.NodeProto()
        conv_node.CopyFrom(node)
        conv_node.input[1] = w
        nodes.append(conv_node)
    else:
        return None
    conv.done[c.name] = how
    conv.kept.pop(c.name, None)
    return nodes
