"""The numeric core against straightforward element-by-element references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from onnxfgq.quant import (
    compute_qparams,
    dequantize,
    fake_quantize,
    pack_int4,
    pack_matmulnbits,
    pack_matmulnbits_zero_points,
    quantize,
    sqnr_db,
    unpack_int4,
    unpack_matmulnbits,
    unpack_matmulnbits_zero_points,
)


def reference_groupwise(w: np.ndarray, group: int, bits: int, symmetric: bool, signed: bool):
    """Loop-per-group reference over a [K, N] weight, groups along K (the last one may be short)."""
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    k, n = w.shape
    codes = np.zeros((k, n), np.int64)
    deq = np.zeros((k, n), np.float64)
    for col in range(n):
        for start in range(0, k, group):
            block = w[start:start + group, col].astype(np.float64)
            if symmetric:  # the extreme (with its sign) maps to the lowest code: scale -extreme / 2**(bits-1)
                zp = (qmin + qmax + 1) // 2
                extreme = block.max() if block.max() >= -block.min() else block.min()
                scale = float(np.float32(-np.float32(extreme) / np.float32(zp - qmin)))
            else:
                lo, hi = min(float(block.min()), 0.0), max(float(block.max()), 0.0)
                scale = float(np.float32((np.float32(hi) - np.float32(lo)) / np.float32(qmax - qmin)))
                zp = int(np.clip(np.round(qmin - np.float32(lo) / np.float32(scale or 1.0)), qmin, qmax))
            scale = scale if abs(scale) > 1e-12 else 1.0
            for i, v in enumerate(block):
                q = int(np.clip(np.round(np.float32(v) / np.float32(scale)) + zp, qmin, qmax))
                codes[start + i, col] = q
                deq[start + i, col] = np.float32((q - zp) * np.float32(scale))
    return codes, deq


@pytest.mark.parametrize("bits,symmetric,signed", [
    (2, False, False), (3, True, False), (4, False, False), (4, True, True), (4, True, False),
    (8, False, False), (8, True, True),
])
@pytest.mark.parametrize("group", [16, 32, 48, 128])
def test_groupwise_matches_reference(bits, symmetric, signed, group):
    rng = np.random.default_rng(bits * 100 + group)
    w = (rng.standard_normal((123, 7)) * rng.uniform(0.01, 2, (1, 7))).astype(np.float32)
    qp = compute_qparams(w, (group, 1), bits, symmetric=symmetric, signed=signed)
    assert qp.scale.shape == (math.ceil(123 / group), 7)
    codes = quantize(w, qp)
    ref_codes, ref_deq = reference_groupwise(w, group, bits, symmetric, signed)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(dequantize(codes, qp), ref_deq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bound_half_step(bits, symmetric):
    """Inside the range, round-to-nearest is off by at most half a step in every block."""
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((200, 9)).astype(np.float32)
    qp = compute_qparams(w, (64, 1), bits, symmetric=symmetric, signed=False)
    err = np.abs(fake_quantize(w, qp) - w)
    step = np.abs(np.repeat(qp.scale, 64, axis=0)[:200])
    # symmetric ranges have one code fewer on the side opposite the extreme: one step clipped there
    bound = step * (1.0 if symmetric else 0.5) + 1e-6
    assert np.all(err <= bound)


def test_granularity_ordering_on_outliers():
    """Finer blocks never do worse; per-tensor collapses on a weight with one outlier column."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 64)).astype(np.float32) * 0.02
    w[:, 3] *= 50
    results = {}
    for name, bs in {"tensor": (256, 64), "channel": (256, 1), "g128": (128, 1), "g32": (32, 1)}.items():
        results[name] = sqnr_db(w, fake_quantize(w, compute_qparams(w, bs, 4, symmetric=False, signed=False)))
    assert results["tensor"] < results["channel"] <= results["g128"] <= results["g32"]
    assert results["g32"] > 18


def test_per_channel_conv_layout():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    qp = compute_qparams(w, (1, 3, 3, 3), 8, symmetric=True, signed=True)
    assert qp.scale.shape == (8, 1, 1, 1)
    flat = w.reshape(8, -1)
    extreme = flat[np.arange(8), np.abs(flat).argmax(1)]
    np.testing.assert_allclose(qp.scale.reshape(-1), -extreme / 128, rtol=1e-6)
    deq = fake_quantize(w, qp).reshape(8, -1)
    np.testing.assert_allclose(deq[np.arange(8), np.abs(flat).argmax(1)], extreme, rtol=1e-6)  # the extreme is exact
    assert sqnr_db(w, fake_quantize(w, qp)) > 38


def test_all_zero_block_is_exact():
    w = np.zeros((32, 4), np.float32)
    w[:, 1] = 1.5
    for sym in (True, False):
        qp = compute_qparams(w, (16, 1), 4, symmetric=sym, signed=False)
        assert np.all(np.isfinite(qp.scale))
        np.testing.assert_allclose(fake_quantize(w, qp)[:, 0], 0.0)


def ref_pack_low_first(values, bits):
    out, acc, nbits = [], 0, 0
    for v in values:
        acc |= (int(v) & ((1 << bits) - 1)) << nbits
        nbits += bits
        if nbits == 8:
            out.append(acc)
            acc, nbits = 0, 0
    if nbits:
        out.append(acc)
    return np.array(out, np.uint8)


@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 4, 3)])
@pytest.mark.parametrize("signed", [True, False])
def test_int4_pack_round_trip(shape, signed):
    rng = np.random.default_rng(2)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, shape)
    packed = pack_int4(codes)
    np.testing.assert_array_equal(packed, ref_pack_low_first(codes.reshape(-1), 4))
    np.testing.assert_array_equal(unpack_int4(packed, shape, signed), codes)


@pytest.mark.parametrize("bits,block,k", [(4, 16, 37), (4, 128, 384), (2, 32, 70), (8, 16, 33), (4, 32, 1536)])
def test_matmulnbits_layout(bits, block, k):
    rng = np.random.default_rng(3)
    n = 5
    codes = rng.integers(0, 2**bits, (n, k))
    blob = pack_matmulnbits(codes, bits, block)
    nb = math.ceil(k / block)
    assert blob.shape == (n, nb, block * bits // 8) and blob.dtype == np.uint8
    for col in range(n):  # each block of one column, zero-padded, low bits first
        for b in range(nb):
            chunk = np.zeros(block, np.int64)
            part = codes[col, b * block:(b + 1) * block]
            chunk[:len(part)] = part
            np.testing.assert_array_equal(blob[col, b], ref_pack_low_first(chunk, bits))
    np.testing.assert_array_equal(unpack_matmulnbits(blob, bits, k), codes)


@pytest.mark.parametrize("bits,nb", list(itertools.product([2, 4, 8], [1, 3, 12])))
def test_matmulnbits_zero_points(bits, nb):
    rng = np.random.default_rng(4)
    zp = rng.integers(0, 2**bits, (6, nb))
    packed = pack_matmulnbits_zero_points(zp, bits)
    assert packed.shape == (6, math.ceil(nb * bits / 8))
    for row in range(6):
        np.testing.assert_array_equal(packed[row], ref_pack_low_first(zp[row], bits))
    np.testing.assert_array_equal(unpack_matmulnbits_zero_points(packed, bits, nb), zp)


def test_sqnr():
    x = np.array([1.0, -2.0, 3.0])
    assert sqnr_db(x, x) == float("inf")
    assert sqnr_db(x, x * 1.1) == pytest.approx(20.0)


@pytest.mark.parametrize("k, block", [(256, 32), (384, 128), (123, 16)])
def test_symmetric_int4_matches_onnxruntime_blockwise(k, block):
    """Symmetric 4-bit blocks are onnxruntime's own (MLAS ``quantize_matmul_4bits``, what its
    MatMulNBitsQuantizer and the genai builder write): same signed scales, same codes."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(k)
    n = 24
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 2, (1, n))).astype(np.float32)
    kb = math.ceil(k / block)
    padded = np.pad(w, ((0, kb * block - k), (0, 0)))
    packed = np.zeros((n, kb, block // 2), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    quantize_matmul_4bits(packed, padded, scales, np.zeros((n, (kb + 1) // 2), np.uint8), block, n, kb * block, True)
    qp = compute_qparams(w, (block, 1), 4, symmetric=True, signed=False)
    np.testing.assert_allclose(qp.scale.T, scales, rtol=1e-6, atol=0)
    assert (scales < 0).any() and (scales > 0).any()  # both signs occur, as in onnxruntime
    ort_codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, kb * block)[:, :k].T
    np.testing.assert_array_equal(quantize(w, qp), ort_codes)


def test_symmetric_grid_beats_half_step_rule():
    """Mapping the extreme to the lowest code (all 16 levels, step extreme/8) rounds Gaussian weights
    more finely than a positive absmax/7.5 scale (step absmax/7.5, half a step unused at each end)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((1024, 64)).astype(np.float32)
    new = sqnr_db(w, fake_quantize(w, compute_qparams(w, (128, 1), 4, symmetric=True, signed=False)))
    _, old_deq = reference_half_step(w, 128)
    assert new > sqnr_db(w, old_deq) + 0.3


def reference_half_step(w: np.ndarray, group: int):
    """The earlier symmetric rule, absmax / 7.5 with zero point 8, for comparison."""
    blocks = w.reshape(-1, group, w.shape[1])
    scale = np.abs(blocks).max(1, keepdims=True) / 7.5
    codes = np.clip(np.round(blocks / scale) + 8, 0, 15)
    return codes.reshape(w.shape), ((codes - 8) * scale).reshape(w.shape)
