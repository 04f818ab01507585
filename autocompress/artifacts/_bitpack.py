"""Bit packing of unsigned integer codes, ``bits`` (1..64) bits each.

Bit order is little-endian throughout: code ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``
with its least significant bit first, and stream bit ``j`` is bit ``j % 8`` (LSB first) of byte
``j // 8``. The last byte is zero-padded. For ``bits`` in {8, 16, 32, 64} the stream is exactly the
little-endian array bytes, and for ``bits`` <= 8 groups of 8 codes are assembled in one uint64
word each (fast paths with the same result as the generic bit-matrix path).
"""

from __future__ import annotations

import numpy as np

_WHOLE_BYTES = (8, 16, 32, 64)


def packed_size(n: int, bits: int) -> int:
    """Bytes taken by ``n`` codes of ``bits`` bits each.

    Example:
        >>> packed_size(10, 3)
        4
    """
    return (n * bits + 7) // 8


def _container(bits: int) -> int:
    """Smallest whole-byte unsigned width (8, 16, 32 or 64) holding ``bits`` bits."""
    return next(w for w in _WHOLE_BYTES if w >= bits)


def pack(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned ``codes`` (each ``< 2**bits``) into ``packed_size(len(codes), bits)`` bytes.

    Example:
        >>> pack(np.array([1, 2, 3]), 2).hex()
        '39'
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits} is outside 1..64")
    codes = np.ascontiguousarray(codes).reshape(-1)
    if codes.dtype.kind not in "ui":
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and int(codes.min()) < 0:
        raise ValueError("codes must be non-negative")
    if bits < 64 and codes.size and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits in _WHOLE_BYTES:
        return codes.astype(f"<u{bits // 8}", copy=False).tobytes()
    if bits < 8:
        return _pack_small(codes, bits)
    width = _container(bits)
    small = codes.astype(f"<u{width // 8}")
    as_bits = np.unpackbits(small.view(np.uint8).reshape(-1, width // 8), axis=1, bitorder="little")
    return np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()


def unpack(data: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack`: ``n`` codes as the smallest fitting unsigned numpy dtype.

    Raises ``ValueError`` when ``data`` does not have exactly ``packed_size(n, bits)`` bytes.

    Example:
        >>> unpack(bytes.fromhex("39"), 2, 3).tolist()
        [1, 2, 3]
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits={bits} is outside 1..64")
    if n < 0 or len(data) != packed_size(n, bits):
        raise ValueError(f"{len(data)} bytes cannot hold exactly {n} codes of {bits} bits")
    width = _container(bits)
    native = np.dtype(f"u{width // 8}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits in _WHOLE_BYTES:
        return raw.view(f"<u{bits // 8}").astype(native)
    if bits < 8:
        return _unpack_small(raw, bits, n)
    as_bits = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits)
    padded = np.zeros((n, width), dtype=np.uint8)
    padded[:, :bits] = as_bits
    packed = np.packbits(padded, axis=1, bitorder="little")
    return packed.reshape(-1).view(f"<u{width // 8}").astype(native)


def _pack_small(codes: np.ndarray, bits: int) -> bytes:
    """``bits`` < 8: code ``i`` of each group of 8 goes to bits ``[i*bits, (i+1)*bits)`` of one
    little-endian uint64, whose first ``bits`` bytes are the group's stream bytes."""
    n = codes.size
    groups = -(-n // 8)
    padded = np.zeros(groups * 8, dtype=np.uint8)
    padded[:n] = codes
    cols = padded.reshape(groups, 8)
    word = cols[:, 0].astype(np.uint64)
    for i in range(1, 8):
        word |= cols[:, i].astype(np.uint64) << np.uint64(i * bits)
    out = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.tobytes()[: packed_size(n, bits)]


def _unpack_small(raw: np.ndarray, bits: int, n: int) -> np.ndarray:
    groups = -(-n // 8)
    buf = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: raw.size] = raw
    buf[:, :bits] = flat.reshape(groups, bits)
    word = buf.view("<u8").reshape(groups)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((groups, 8), dtype=np.uint8)
    for i in range(8):
        out[:, i] = (word >> np.uint64(i * bits)) & mask
    return out.reshape(-1)[:n]
