from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.artifacts._encode import (
    Stream,
    _candidates,
    decode,
    encode_best,
    raw_size,
    relidx_decode,
    relidx_encode,
)


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
    for s in raw:  # every candidate decodes and has its declared size
        assert len(s.data) == raw_size(s.enc, codes.size, s.n, bits, len(aux))
        assert np.array_equal(decode(s, codes.size, bits, len(aux))[1], codes)


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
