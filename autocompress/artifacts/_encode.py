"""Dense and sparse encodings of one tensor's integer codes, plus optional entropy coding.

A tensor reaches this module as ``numel`` unsigned codes of ``bits`` bits each where code ``0``
means "zero element", and an ``aux`` byte string (fp16 scales or codebook, possibly empty). Its
stream is ``aux`` followed by one of:

* ``d`` dense: all codes, bit-packed (see ``_bitpack``).
* ``m`` bitmask: ``numel`` bits (1 = nonzero), then the packed codes of the ``n`` nonzeros.
* ``r{k}`` relative index (Deep Compression), ``k`` in 1..8: ``n`` entries in flat order, first all
  their ``k``-bit gaps, then all their packed codes. An entry at flat position ``p`` stores
  ``p - previous_position - 1`` (the first entry counts from position -1), so one gap covers
  distances 1..2**k; a longer distance first inserts filler entries of code 0 every ``2**k``
  positions. Trailing zeros are implicit.

The stream is then stored as is (codec ``n``), raw-deflate compressed (``z``, zlib level 9,
no header) or raw-LZMA2 compressed (``x``, decoded with a 1 MiB dictionary), whichever is
smallest.
"""

from __future__ import annotations

import lzma
import re
import zlib
from dataclasses import dataclass

import numpy as np

from autocompress.artifacts._bitpack import pack, packed_size, unpack

CODECS = ("n", "z", "x")
_ENC_RE = re.compile(r"^(d|m|r[1-8])$")
_LZMA_DECODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]


@dataclass(frozen=True)
class Stream:
    """One encoded tensor stream.

    Args:
        enc: ``"d"``, ``"m"`` or ``"r1"``..``"r8"``.
        codec: ``"n"`` (none), ``"z"`` (raw deflate) or ``"x"`` (raw LZMA2).
        n: stored entries (nonzeros for ``m``, entries with fillers for ``r{k}``, numel for ``d``).
        data: the bytes stored in the artifact.
    """

    enc: str
    codec: str
    n: int
    data: bytes


def is_encoding(enc: str) -> bool:
    """True for a known encoding id."""
    return bool(_ENC_RE.match(enc))


def raw_size(enc: str, numel: int, n: int, bits: int, aux_len: int) -> int:
    """Length of the uncompressed stream of an encoding (known before decoding anything).

    Example:
        >>> raw_size("r4", numel=100, n=10, bits=4, aux_len=0)  # 10 gaps + 10 codes of 4 bits
        10
    """
    if enc == "d":
        return aux_len + packed_size(numel, bits)
    if enc == "m":
        return aux_len + packed_size(numel, 1) + packed_size(n, bits)
    return aux_len + packed_size(n, int(enc[1:])) + packed_size(n, bits)


def relidx_encode(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps and codes of the relative-index entries of ``codes`` (fillers have code 0).

    Example:
        >>> g, c = relidx_encode(np.array([0, 5, 0, 0, 0, 0, 0, 7]), k=2)
        >>> g.tolist(), c.tolist()
        ([1, 3, 1], [5, 0, 7])
    """
    pos = np.flatnonzero(codes)
    dist = np.diff(pos, prepend=-1)
    span = 1 << k
    fillers = (dist - 1) // span
    reps = fillers + 1
    last = np.cumsum(reps) - 1
    gaps = np.full(int(reps.sum()), span - 1, dtype=np.int64)
    gaps[last] = dist - 1 - fillers * span
    out = np.zeros(gaps.size, dtype=codes.dtype)
    out[last] = codes[pos]
    return gaps, out


def relidx_decode(gaps: np.ndarray, entries: np.ndarray, numel: int) -> np.ndarray:
    """Dense codes from relative-index entries; ``ValueError`` if they run past ``numel``."""
    out = np.zeros(numel, dtype=entries.dtype)
    if gaps.size:
        pos = np.cumsum(gaps.astype(np.int64) + 1) - 1
        if pos[-1] >= numel:
            raise ValueError(f"relative index runs past the tensor end ({pos[-1]} >= {numel})")
        out[pos] = entries
    return out


def _compress(codec: str, raw: bytes) -> bytes:
    if codec == "z":
        c = zlib.compressobj(6, zlib.DEFLATED, -15, 9)
        return c.compress(raw) + c.flush()
    dict_size = max(4096, min(1 << 20, len(raw)))
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": dict_size, "lc": 0, "pb": 0}]
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=filters)


def decompress(codec: str, data: bytes, expected: int) -> bytes:
    """Decompress ``data`` to exactly ``expected`` bytes (never more), else ``ValueError``."""
    if codec == "n":
        out, done = data, True
    elif codec == "z":
        d = zlib.decompressobj(-15)
        out = d.decompress(data, expected)
        done = d.eof and not d.unconsumed_tail and not d.unused_data
    elif codec == "x":
        dx = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=_LZMA_DECODE_FILTERS)
        out = dx.decompress(data, max_length=expected)
        done = dx.eof and not dx.unused_data
    else:
        raise ValueError(f"unknown codec {codec!r}")
    if not done or len(out) != expected:
        raise ValueError(f"stream does not decode to the declared {expected} bytes")
    return out


def _candidates(codes: np.ndarray, bits: int, aux: bytes, sparse: bool) -> list[Stream]:
    numel = codes.size
    out = [Stream("d", "n", numel, aux + pack(codes, bits))]
    if not sparse or numel == 0:
        return out
    nz = codes != 0
    vals = codes[nz]
    mask = np.packbits(nz, bitorder="little").tobytes()
    out.append(Stream("m", "n", vals.size, aux + mask + pack(vals, bits)))
    for k in range(1, 9):
        gaps, entries = relidx_encode(codes, k)
        out.append(Stream(f"r{k}", "n", gaps.size, aux + pack(gaps, k) + pack(entries, bits)))
    return out


def encode_best(
    codes: np.ndarray, bits: int, aux: bytes = b"", *, sparse: bool = True, entropy: bool = True
) -> Stream:
    """The smallest stream of ``codes`` over the encodings and codecs (ties: first tried).

    Every encoding is tried raw. Entropy coding (slow on big tensors) is tried on dense, bitmask,
    the best raw relative index and ``r8`` (byte-aligned gaps, which LZMA models best), skipping
    those more than 1.5x larger than the best raw stream (they never win in practice).

    Example:
        >>> codes = np.zeros(1000, dtype=np.uint8); codes[::97] = 3
        >>> encode_best(codes, 2, entropy=False).enc
        'r7'
    """
    cands = _candidates(np.ascontiguousarray(codes).reshape(-1), bits, aux, sparse)
    best = min(cands, key=lambda s: len(s.data))
    if entropy:
        rel = [s for s in cands if s.enc.startswith("r")]
        tries = cands[:2] + ([min(rel, key=lambda s: len(s.data)), rel[-1]] if rel else [])
        limit = 1.5 * len(best.data)
        for cand in dict.fromkeys(s for s in tries if len(s.data) <= limit):
            for codec in ("z", "x"):
                packed = _compress(codec, cand.data)
                if len(packed) < len(best.data):
                    best = Stream(cand.enc, codec, cand.n, packed)
    return best


def decode(stream: Stream, numel: int, bits: int, aux_len: int) -> tuple[bytes, np.ndarray]:
    """``(aux, codes)`` back from a stream; ``ValueError`` on any inconsistency."""
    enc, n = stream.enc, stream.n
    raw = decompress(stream.codec, stream.data, raw_size(enc, numel, n, bits, aux_len))
    view = memoryview(raw)
    aux, body = bytes(view[:aux_len]), view[aux_len:]
    if enc == "d":
        return aux, unpack(body, bits, numel)
    if enc == "m":
        mask_len = packed_size(numel, 1)
        mask = np.unpackbits(
            np.frombuffer(body[:mask_len], np.uint8), count=numel, bitorder="little"
        )
        if int(mask.sum()) != n:
            raise ValueError(f"bitmask has {int(mask.sum())} nonzeros, layout declares {n}")
        vals = unpack(body[mask_len:], bits, n)
        if n and not vals.all():
            raise ValueError("bitmask stream stores a zero code for a nonzero position")
        out = np.zeros(numel, dtype=vals.dtype)
        out[mask.astype(bool)] = vals
        return aux, out
    k = int(enc[1:])
    gap_len = packed_size(n, k)
    gaps = unpack(body[:gap_len], k, n)
    return aux, relidx_decode(gaps, unpack(body[gap_len:], bits, n), numel)
