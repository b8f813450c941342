"""Properties of the numeric core (onnxfgq.quant) over any shape, block and bit width: codes stay in
range, round-to-nearest error is at most half a step per element, and every packing layout round-trips.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxfgq.algorithms import RTN, QuantSpec
from onnxfgq.quant import (
    compute_qparams,
    dequantize,
    expand_blocks,
    pack_int4,
    pack_matmulnbits,
    pack_matmulnbits_kn,
    pack_matmulnbits_zero_points,
    quantize,
    unpack_int4,
    unpack_matmulnbits,
    unpack_matmulnbits_zero_points,
)
from onnxfgq.quant.bitstream import pack_bitstream, unpack_bitstream

FAST = settings(max_examples=60, deadline=None)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def weight_and_block(draw):
    k = draw(st.integers(1, 150))
    n = draw(st.integers(1, 12))
    w = draw(hnp.arrays(np.float32, (k, n), elements=finite))
    bk = draw(st.integers(1, k + 40))  # includes blocks that do not divide K, and blocks past K
    bn = draw(st.sampled_from([1, n]))
    return w, (bk, bn)


@FAST
@given(weight_and_block(), st.integers(2, 8), st.booleans(), st.booleans())
def test_rtn_error_is_at_most_half_a_step(wb, bits, symmetric, signed):
    w, block = wb
    qp = compute_qparams(w, block, bits, symmetric=symmetric, signed=signed)
    q = quantize(w, qp)
    assert q.shape == w.shape
    assert q.min() >= qp.qr.qmin and q.max() <= qp.qr.qmax
    # symmetric scales carry the sign of the block's extreme (it maps to the lowest code)
    assert np.all(np.isfinite(qp.scale)) and np.all(qp.scale != 0)
    scale = np.abs(expand_blocks(qp.scale, w.shape, qp.block_shape))
    err = np.abs(w.astype(np.float64) - dequantize(q, qp))
    # symmetric: the side opposite the extreme has one code fewer, so one clipped step there
    steps = np.where(np.sign(w) == np.sign(expand_blocks(qp.scale, w.shape, qp.block_shape)), 1.0, 0.5) \
        if symmetric else 0.5
    assert np.all(err <= scale * (steps + 1e-4) + 1e-6 * np.abs(w)), float((err / scale).max())


@FAST
@given(weight_and_block(), st.integers(2, 8), st.booleans())
def test_rtn_algorithm_round_trip(wb, bits, symmetric):
    w, block = wb
    qw = RTN().solve(w, QuantSpec(bits, block, symmetric))
    assert qw.codes.min() >= 0 and qw.codes.max() < 2 ** bits
    scale = np.abs(expand_blocks(qw.qparams.scale, w.shape, qw.qparams.block_shape))
    assert np.all(np.abs(w - qw.dequantize()) <= scale * ((1.0 if symmetric else 0.5) + 1e-4) + 1e-6 * np.abs(w))
    zero = np.zeros_like(w)
    assert np.array_equal(RTN().solve(zero, QuantSpec(bits, block, symmetric)).dequantize(), zero)


@FAST
@given(st.data(), st.booleans())
def test_int4_packing_round_trip(data, signed):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=9))
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = data.draw(hnp.arrays(np.int32, shape, elements=st.integers(lo, hi)))
    packed = pack_int4(codes)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size // 2)
    assert np.array_equal(unpack_int4(packed, shape, signed), codes)


@FAST
@given(st.data(), st.sampled_from([2, 4, 8]), st.sampled_from([16, 32, 64, 128]))
def test_matmulnbits_packing_round_trip(data, bits, block):
    n = data.draw(st.integers(1, 6))
    k = data.draw(st.integers(1, 300))  # K need not be a multiple of the block
    codes = data.draw(hnp.arrays(np.uint8, (n, k), elements=st.integers(0, 2 ** bits - 1)))
    blob = pack_matmulnbits(codes, bits, block)
    assert blob.shape == (n, -(-k // block), block * bits // 8)
    assert np.array_equal(unpack_matmulnbits(blob, bits, k), codes)
    assert np.array_equal(pack_matmulnbits_kn(np.ascontiguousarray(codes.T), bits, block), blob)  # the emitter's route
    blocks = -(-k // block)
    zp = data.draw(hnp.arrays(np.uint8, (n, blocks), elements=st.integers(0, 2 ** bits - 1)))
    packed = pack_matmulnbits_zero_points(zp, bits)
    assert packed.shape == (n, -(-blocks * bits // 8))
    assert np.array_equal(unpack_matmulnbits_zero_points(packed, bits, blocks), zp)


@FAST
@given(st.data(), st.integers(2, 8))
def test_bitstream_round_trip(data, bits):
    n = data.draw(st.integers(1, 5))
    k = data.draw(st.integers(1, 200))
    codes = data.draw(hnp.arrays(np.int32, (n, k), elements=st.integers(0, 2 ** bits - 1)))
    packed = pack_bitstream(codes, bits)
    assert packed.shape == (n, -(-k * bits // 8))
    assert np.array_equal(unpack_bitstream(packed, bits, k), codes)
