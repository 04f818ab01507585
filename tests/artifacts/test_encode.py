from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.artifacts._encode import (
    SMALL,
    Stream,
    build,
    decode,
    encode_best,
    entry_counts,
    raw_size,
    relidx_decode,
    relidx_encode,
)


def _candidates(codes: np.ndarray, bits: int, aux: bytes, sparse: bool) -> list[Stream]:
    """Every raw stream, built (what the exporter only estimates)."""
    encs = ["d"] + (["m"] + [f"r{k}" for k in range(1, 9)] if sparse and codes.size else [])
    encs += ["p"] if bits in (16, 32, 64) else []
    return [build(e, codes, bits, aux) for e in encs]


@st.composite
def sparse_codes(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 16))
    n = draw(st.integers(0, 600))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(1, 2**bits, n) * (rng.random(n) < density)
    return codes.astype(np.uint32), bits


@settings(max_examples=100, deadline=None)
@given(sparse_codes(), st.integers(1, 8))
def test_relidx_round_trip_with_long_gaps(cb: tuple[np.ndarray, int], k: int) -> None:
    codes, _ = cb
    gaps, entries = relidx_encode(codes, k)
    assert gaps.size == 0 or gaps.max() < 2**k
    assert np.count_nonzero(entries) == np.count_nonzero(codes)
    assert np.array_equal(relidx_decode(gaps, entries, codes.size), codes)


def test_relidx_inserts_fillers() -> None:
    codes = np.zeros(40, dtype=np.uint8)
    codes[[0, 4, 39]] = [1, 2, 3]
    gaps, entries = relidx_encode(codes, 2)  # one gap covers a distance of 1..4
    # 0 -> distance 1; 4 -> 4; 39 -> 35 = 8 fillers of 4 + 3
    assert gaps.tolist() == [0, 3] + [3] * 8 + [2]
    assert entries.tolist() == [1, 2] + [0] * 8 + [3]
    with pytest.raises(ValueError, match="past the tensor end"):
        relidx_decode(gaps, entries, 39)


@settings(max_examples=100, deadline=None)
@given(sparse_codes(), st.binary(max_size=20), st.booleans())
def test_encode_best_round_trip_and_is_smallest(
    cb: tuple[np.ndarray, int], aux: bytes, entropy: bool
) -> None:
    codes, bits = cb
    best = encode_best(codes, bits, aux, entropy=entropy)
    got_aux, got = decode(best, codes.size, bits, len(aux))
    assert got_aux == aux and np.array_equal(got, codes)
    raw = _candidates(codes, bits, aux, sparse=True)
    assert len(best.data) <= min(len(s.data) for s in raw)
    counts = entry_counts(codes)
    for s in raw:  # every candidate decodes, has its declared size and its estimated count
        assert len(s.data) == raw_size(s.enc, codes.size, s.n, bits, len(aux))
        assert np.array_equal(decode(s, codes.size, bits, len(aux))[1], codes)
        if s.enc in counts:
            assert counts[s.enc] == s.n, s.enc


def test_relidx_beats_bitmask_at_90_percent_sparsity() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(1, 15, 30_000) * (rng.random(30_000) < 0.1)
    sizes = {s.enc: len(s.data) for s in _candidates(codes.astype(np.uint32), 4, b"", True)}
    best_rel = min(v for k, v in sizes.items() if k.startswith("r"))
    print(
        f"\n4-bit, 90% sparse, 30000 codes: dense {sizes['d']} B, bitmask {sizes['m']} B, "
        f"best relative index {best_rel} B"
    )
    assert best_rel < sizes["m"] < sizes["d"]
    assert encode_best(codes, 4, entropy=False).enc.startswith("r")


def test_encode_best_picks_dense_when_full() -> None:
    codes = np.random.default_rng(1).integers(1, 255, 5000)
    assert encode_best(codes, 8, entropy=False).enc == "d"


def test_decode_refuses_inconsistent_streams() -> None:
    with pytest.raises(ValueError, match="declared"):
        decode(Stream("d", "n", 4, b"\x00"), 4, 4, 0)
    with pytest.raises(ValueError, match="declared"):
        decode(Stream("d", "z", 4, b"\x03\x00"), 4, 4, 0)  # valid empty deflate, wrong length
    mask = bytes([0b0101])  # two nonzeros, layout claims three
    with pytest.raises(ValueError, match="bitmask has 2 nonzeros"):
        decode(Stream("m", "n", 3, mask + b"\x11\x01"), 4, 4, 0)
    with pytest.raises(ValueError, match="unknown codec"):
        decode(Stream("d", "q", 4, b"\x00\x00"), 4, 4, 0)


def test_decompression_is_bounded() -> None:
    bomb = encode_best(np.zeros(1 << 20, dtype=np.uint8), 8, sparse=False)
    assert bomb.codec != "n" and len(bomb.data) < 2000
    with pytest.raises(ValueError, match="declared"):
        decode(bomb, 1000, 8, 0)  # would inflate far past the declared size


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_byte_planes_round_trip(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 2**bits - 1, 999, dtype=np.uint64)
    s = build("p", codes, bits, b"ab")
    assert len(s.data) == raw_size("p", 999, 999, bits, 2)
    aux, got = decode(s, 999, bits, 2)
    assert aux == b"ab" and np.array_equal(got.astype(np.uint64), codes)
    with pytest.raises(ValueError, match="byte planes"):
        decode(Stream("p", "n", 999, s.data), 999 * bits // 8, 8, 2)


def gaussian_fp32(n: int, seed: int = 0) -> np.ndarray:
    w = (np.random.default_rng(seed).standard_normal(n) * 0.02).astype(np.float32)
    return w.view("<u4")


def test_big_fp32_uses_planes_and_zstd() -> None:
    codes = gaussian_fp32(300_000)  # 1.2 MB: the big-stream path
    best = encode_best(codes, 32)
    print(f"\nfp32 N(0, 0.02), 300k values: {len(best.data) / (4 * codes.size):.3f} of raw")
    assert (best.enc, best.codec) == ("p", "s")
    assert len(best.data) < 0.9 * 4 * codes.size  # the sign/exponent plane compresses
    assert np.array_equal(decode(best, codes.size, 32, 0)[1], codes)


def test_incompressible_big_stream_is_stored_raw() -> None:
    codes = np.random.default_rng(3).integers(0, 2**32, 600_000, dtype=np.uint64)
    best = encode_best(codes.astype(np.uint32), 32)
    assert best.codec == "n" and len(best.data) == 4 * codes.size


def test_small_streams_still_try_lzma() -> None:
    rng = np.random.default_rng(0)
    q = np.clip(np.round(rng.standard_normal(20_000) * 1.5), -7, 7).astype(np.int64)
    codes = np.where(q >= 0, 2 * q, -2 * q - 1) * (rng.random(20_000) < 0.1)
    best = encode_best(codes.astype(np.uint32), 4)
    assert len(best.data) <= SMALL and best.codec in ("s", "x")
    raw = min(len(s.data) for s in _candidates(codes.astype(np.uint32), 4, b"", True))
    assert len(best.data) < 0.95 * raw


def test_zstd_stream_is_bounded_and_strict() -> None:
    codes = gaussian_fp32(400_000)
    best = encode_best(codes, 32)
    assert best.codec == "s"
    expected = raw_size("p", codes.size, codes.size, 32, 0)
    with pytest.raises(ValueError, match="declared"):
        decode(best, codes.size - 1, 32, 0)  # the frame declares another size
    with pytest.raises(ValueError, match="corrupt|declared"):
        decode(Stream("p", "s", codes.size, bytes(best.data) + b"x"), codes.size, 32, 0)
    assert expected == 4 * codes.size
