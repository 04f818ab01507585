"""Dense and sparse encodings of one tensor's integer codes, plus optional entropy coding.

A tensor reaches this module as ``numel`` unsigned codes of ``bits`` bits each where code ``0``
means "zero element", and an ``aux`` byte string (fp16 scales or codebook, possibly empty). Its
stream is ``aux`` followed by one of:

* ``d`` dense: all codes, bit-packed (see ``_bitpack``).
* ``p`` byte planes (``bits`` 16, 32 or 64 only): the little-endian code bytes transposed, all
  first bytes, then all second bytes... The high bytes of floats (sign and exponent) are then
  contiguous and compress well, the mantissa bytes stay incompressible noise.
* ``m`` bitmask: ``numel`` bits (1 = nonzero), then the packed codes of the ``n`` nonzeros.
* ``r{k}`` relative index (Deep Compression), ``k`` in 1..8: ``n`` entries in flat order, first all
  their ``k``-bit gaps, then all their packed codes. An entry at flat position ``p`` stores
  ``p - previous_position - 1`` (the first entry counts from position -1), so one gap covers
  distances 1..2**k; a longer distance first inserts filler entries of code 0 every ``2**k``
  positions. Trailing zeros are implicit.

The stream is then stored as is (codec ``n``), zstd-compressed (``s``, one frame declaring its
content size), raw-LZMA2 compressed (``x``, decoded with a 1 MiB dictionary) or, in artifacts of
weights format 1 only, raw-deflate compressed (``z``).

Choosing is cheap: the raw size of every encoding follows from counts (nonzeros, gap statistics)
without building the streams, so only the smallest is built. Streams of up to ``SMALL`` bytes
then also try LZMA and high-level zstd on a few close candidates (the search that small
artifacts' sizes depend on, a few milliseconds each; the exporter does it only for models of at
most ``SEARCH_NUMEL`` values); other streams get fast zstd, after a sampled check when big
(random fp32 mantissas never shrink).
"""

from __future__ import annotations

import lzma
import re
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

from autocompress.artifacts._bitpack import pack, packed_size, unpack

CODECS = ("n", "s", "x", "z")
_ENC_RE = re.compile(r"^(d|p|m|r[1-8])$")
_LZMA_DECODE_FILTERS = [{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 20}]
SMALL = 64 << 10
"""Streams up to this many bytes try every close candidate with LZMA and zstd level 19."""
SEARCH_NUMEL = 4_000_000
"""Models with at most this many state-dict values get the small-stream search (below that the
search costs well under a second; above it, its few hundred bytes per tensor do not matter)."""
_SAMPLE = 16 << 10
_SAMPLES = 16
_GAIN = 0.97
"""A big stream is compressed only when a sample shrinks below this fraction of its size."""
_PLANE_BITS = (16, 32, 64)
_FAST = zstandard.ZstdCompressionParameters.from_level(1, hash_log=10, min_match=7)
"""zstd for big streams: level 1 with a 1 KiB hash table and 7-byte matches. Weight streams
are mostly entropy-coded literals; measured ~2x faster than level 1 and slightly smaller on
fp32 byte planes and packed 4-bit codes."""


@dataclass(frozen=True)
class Stream:
    """One encoded tensor stream.

    Args:
        enc: ``"d"``, ``"p"``, ``"m"`` or ``"r1"``..``"r8"``.
        codec: ``"n"`` (none), ``"s"`` (zstd), ``"x"`` (raw LZMA2) or ``"z"`` (raw deflate).
        n: stored entries (nonzeros for ``m``, entries with fillers for ``r{k}``, numel for
            ``d``/``p``).
        data: the bytes stored in the artifact (any bytes-like object).
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
    if enc in ("d", "p"):
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


def entry_counts(codes: np.ndarray, sparse: bool = True, bits: int = 1) -> dict[str, int]:
    """Stored entries of every applicable encoding of flat ``codes``, from counts alone.

    ``r{k}`` stores one entry per nonzero plus ``(gap >> k)`` fillers per gap, so one histogram
    of the gaps gives all eight widths without encoding any of them. The relative indexes are
    left out when even their lower bound (``bits + 1`` bits per nonzero) cannot beat dense or
    bitmask for ``bits``-bit codes.

    Example:
        >>> entry_counts(np.array([0, 5, 0, 0, 0, 0, 0, 7]))["r2"]  # gaps 1 and 5: one filler
        3
    """
    numel = codes.size
    out = {"d": numel}
    if not sparse or numel == 0:
        return out
    nz = int(np.count_nonzero(codes))
    out["m"] = nz
    best = min(numel * bits, numel + nz * bits)
    if nz == numel or nz * (bits + 1) >= best:
        return out  # no relative index can be smaller
    pos = np.flatnonzero(codes)
    gaps = np.diff(pos, prepend=-1) - 1
    cap = 1 << 9
    hist = np.bincount(np.minimum(gaps, cap), minlength=cap + 1)
    tail = gaps[gaps >= cap]
    values = np.arange(cap)
    for k in range(1, 9):
        fill = int((hist[:cap] * (values >> k)).sum()) + int((tail >> k).sum())
        out[f"r{k}"] = nz + fill
    return out


def build(enc: str, codes: np.ndarray, bits: int, aux: bytes) -> Stream:
    """The raw (codec ``n``) stream of ``codes`` in encoding ``enc``.

    Example:
        >>> build("p", np.array([1, 2], dtype=np.uint16), 16, b"").data.hex()
        '01020000'
    """
    numel = codes.size
    if enc == "d":
        return Stream("d", "n", numel, aux + pack(codes, bits))
    if enc == "p":
        width = bits // 8
        planes = codes.astype(f"<u{width}", copy=False).view(np.uint8).reshape(numel, width)
        out = np.empty(len(aux) + numel * width, dtype=np.uint8)
        out[: len(aux)] = np.frombuffer(aux, dtype=np.uint8)
        body = out[len(aux) :].reshape(width, numel)
        for i in range(width):  # plane by plane: ~2x faster than one strided transpose
            body[i] = planes[:, i]
        return Stream("p", "n", numel, memoryview(out))
    if enc == "m":
        nz = codes != 0
        vals = codes[nz]
        mask = np.packbits(nz, bitorder="little").tobytes()
        return Stream("m", "n", vals.size, aux + mask + pack(vals, bits))
    k = int(enc[1:])
    gaps, entries = relidx_encode(codes, k)
    return Stream(enc, "n", gaps.size, aux + pack(gaps, k) + pack(entries, bits))


def _compress(codec: str, raw: bytes, level: int = 1) -> bytes:
    if codec == "s":
        if level == 1:  # a small hash table and long matches: weights are mostly literals
            return zstandard.ZstdCompressor(compression_params=_FAST).compress(raw)
        return zstandard.ZstdCompressor(level=level).compress(raw)
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
    elif codec == "s":
        if zstandard.frame_content_size(data) != expected:  # bounds the output before decoding
            raise ValueError(f"stream does not decode to the declared {expected} bytes")
        try:
            out = zstandard.ZstdDecompressor().decompress(
                data, max_output_size=expected, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            raise ValueError(f"zstd stream is corrupt ({e})") from None
        done = True
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


def _shrinks(data: bytes) -> bool:
    """Whether zstd level 1 shrinks evenly spaced samples of a big stream below ``_GAIN``."""
    if len(data) <= _SAMPLE * _SAMPLES * 4:
        return True  # compressing it all is about as cheap as sampling
    view = memoryview(data)
    step = (len(data) - _SAMPLE) // (_SAMPLES - 1)
    sample = b"".join(view[i * step : i * step + _SAMPLE] for i in range(_SAMPLES))
    return len(_compress("s", sample)) < _GAIN * len(sample)


def encode_best(
    codes: np.ndarray,
    bits: int,
    aux: bytes = b"",
    *,
    sparse: bool = True,
    entropy: bool = True,
    search: bool = True,
) -> Stream:
    """The smallest stream of ``codes`` this module finds (see the module docstring).

    The raw stream is always the smallest raw encoding (ties: ``d``, ``m``, ``r1``..``r8``);
    a compressed stream replaces it only when strictly smaller. ``search=False`` skips the
    LZMA / zstd-19 search on small streams (zstd level 1 only): the exporter's choice for big
    models, where it would cost seconds and save a few hundred bytes.

    Example:
        >>> codes = np.zeros(1000, dtype=np.uint8); codes[::97] = 3
        >>> encode_best(codes, 2, entropy=False).enc
        'r7'
    """
    codes = np.ascontiguousarray(codes).reshape(-1)
    counts = entry_counts(codes, sparse, bits)
    sizes = {e: raw_size(e, codes.size, n, bits, len(aux)) for e, n in counts.items()}
    first = min(sizes, key=lambda e: sizes[e])
    best = build(first, codes, bits, aux)
    if not entropy or not best.data:
        return best
    if search and sizes[first] <= SMALL:
        tries = [first] + [e for e in ("d", "m") if e in sizes]
        rel = [e for e in sizes if e.startswith("r")]
        tries += [min(rel, key=lambda e: sizes[e]), "r8"] if rel else []
        tries += ["p"] if bits in _PLANE_BITS else []
        limit = 1.5 * sizes[first]
        for enc in dict.fromkeys(e for e in tries if sizes.get(e, sizes["d"]) <= limit):
            cand = best if enc == first else build(enc, codes, bits, aux)
            for codec, level in (("s", 19), ("x", 0)):
                packed = _compress(codec, cand.data, level)
                if len(packed) < len(best.data):
                    best = Stream(cand.enc, codec, cand.n, packed)
        return best
    if first == "d" and bits in _PLANE_BITS:
        best = build("p", codes, bits, aux)
    if _shrinks(best.data):
        packed = _compress("s", best.data)
        if len(packed) < len(best.data):
            return Stream(best.enc, "s", best.n, packed)
    return best


def decode(stream: Stream, numel: int, bits: int, aux_len: int) -> tuple[bytes, np.ndarray]:
    """``(aux, codes)`` back from a stream; ``ValueError`` on any inconsistency."""
    enc, n = stream.enc, stream.n
    raw = decompress(stream.codec, stream.data, raw_size(enc, numel, n, bits, aux_len))
    view = memoryview(raw)
    aux, body = bytes(view[:aux_len]), view[aux_len:]
    if enc == "d":
        return aux, unpack(body, bits, numel)
    if enc == "p":
        if bits not in _PLANE_BITS:
            raise ValueError(f"byte planes need 16, 32 or 64-bit codes, not {bits}")
        width = bits // 8
        planes = np.frombuffer(body, dtype=np.uint8).reshape(width, numel)
        out = np.empty((numel, width), dtype=np.uint8)
        for i in range(width):  # plane by plane, as written
            out[:, i] = planes[i]
        return aux, out.view(f"<u{width}").reshape(numel)
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
