from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.artifacts._bitpack import pack, packed_size, unpack


@st.composite
def codes_and_bits(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    bits = draw(st.integers(1, 16))
    n = draw(st.integers(0, 300))
    values = draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n))
    return np.array(values, dtype=np.int64), bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_pack_round_trip(cb: tuple[np.ndarray, int]) -> None:
    codes, bits = cb
    data = pack(codes, bits)
    assert len(data) == packed_size(codes.size, bits)
    assert np.array_equal(unpack(data, bits, codes.size).astype(np.int64), codes)


@pytest.mark.parametrize("bits", [24, 32, 33, 64])
def test_pack_round_trip_wide(bits: int) -> None:
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2 ** min(bits, 63), 101, dtype=np.uint64)
    assert np.array_equal(unpack(pack(codes, bits), bits, 101).astype(np.uint64), codes)


def test_bit_order_is_little_endian() -> None:
    # code 0 -> bits 0..2, code 1 -> bits 3..5, LSB first within the code and the byte.
    assert pack(np.array([0b101, 0b011]), 3) == bytes([0b011101])
    assert pack(np.array([0x1234]), 16) == b"\x34\x12"
    assert pack(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1) == b"\x01\x01"


def test_pack_refuses_out_of_range() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        pack(np.array([4]), 2)
    with pytest.raises(ValueError, match="non-negative"):
        pack(np.array([-1]), 8)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(b"\x00\x00", 4, 1)


@pytest.mark.parametrize("bits", range(1, 8))
def test_small_width_fast_path_matches_the_bit_matrix(bits: int) -> None:
    codes = np.random.default_rng(bits).integers(0, 2**bits, 1001)
    as_bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")
    reference = np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()
    assert pack(codes, bits) == reference
    assert np.array_equal(unpack(reference, bits, codes.size), codes)
