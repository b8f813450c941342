import numpy as np
import pytest

from onnxfgq.quant.bitstream import pack_bitstream, packed_row_bytes, unpack_bitstream


def slow_pack(codes, bits):
    """Straightforward reference: set each bit of each code one at a time."""
    n, k = codes.shape
    out = np.zeros((n, (k * bits + 7) // 8), dtype=np.uint8)
    for r in range(n):
        for c in range(k):
            value = int(codes[r, c])
            for b in range(bits):
                if (value >> b) & 1:
                    j = c * bits + b
                    out[r, j // 8] |= 1 << (j % 8)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("k", [1, 7, 8, 13, 123])
def test_matches_slow_reference_and_round_trips(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    codes = rng.integers(0, 1 << bits, size=(5, k), dtype=np.int64)
    packed = pack_bitstream(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (5, packed_row_bytes(k, bits))
    np.testing.assert_array_equal(packed, slow_pack(codes, bits))
    np.testing.assert_array_equal(unpack_bitstream(packed, bits, k), codes)


def test_known_bytes_for_4_bit_low_nibble_first():
    codes = np.array([[1, 2, 3, 4, 15]])
    np.testing.assert_array_equal(pack_bitstream(codes, 4), [[0x21, 0x43, 0x0F]])


def test_known_bytes_for_3_bit():
    # codes 5 (101), 3 (011), 7 (111): bit stream 101 110 111 -> bits 0..8 = 1,0,1,1,1,0,1,1,1
    packed = pack_bitstream(np.array([[5, 3, 7]]), 3)
    np.testing.assert_array_equal(packed, [[0b11011101, 0b00000001]])


def test_padding_bits_are_zero():
    codes = np.full((3, 5), 7, dtype=np.uint8)
    packed = pack_bitstream(codes, 3)  # 15 bits -> 2 bytes, top bit zero
    assert (packed[:, -1] & 0x80 == 0).all()


def test_accepts_various_integer_dtypes():
    codes = np.arange(16, dtype=np.int32).reshape(2, 8) % 4
    for dtype in (np.uint8, np.int8, np.int16, np.uint32, np.int64):
        np.testing.assert_array_equal(
            pack_bitstream(codes.astype(dtype), 2), pack_bitstream(codes, 2))


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_bitstream(np.array([[0, 16]]), 4)
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_bitstream(np.array([[-1, 0]]), 4)


def test_rejects_bad_shapes_and_types():
    with pytest.raises(ValueError, match="2-D"):
        pack_bitstream(np.zeros(4, dtype=np.uint8), 4)
    with pytest.raises(TypeError):
        pack_bitstream(np.zeros((2, 2), dtype=np.float32), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bitstream(np.zeros((2, 2), dtype=np.uint8), 9)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bitstream(np.zeros((2, 3), dtype=np.uint8), 4, 8)


def test_empty_rows():
    packed = pack_bitstream(np.zeros((0, 10), dtype=np.uint8), 5)
    assert packed.shape == (0, 7)
    assert unpack_bitstream(packed, 5, 10).shape == (0, 10)
