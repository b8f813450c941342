"""Clipping search: per-block ratios never lose to plain min/max on the error they minimise."""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.clip import ClipSearch, block_sums, search_qparams
from onnxfgq.algorithms.rtn import RTN
from onnxfgq.algorithms.stats import ActivationStats, output_error
from onnxfgq.quant import block_reduce, dequantize, quantize


def test_block_sums_with_short_blocks():
    x = np.arange(7 * 3, dtype=np.float32).reshape(7, 3)
    got = block_sums(x, (4, 1))
    np.testing.assert_allclose(got, np.stack([x[:4].sum(0), x[4:].sum(0)]))


def test_clip_never_worse_per_block_and_shrinks_outlier_blocks():
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (123, 40)).astype(np.float32)  # heavy tails stretch the min/max ranges
    spec = QuantSpec(4, (32, 1), False)
    rtn = RTN().solve(w, spec)
    qp = search_qparams(w, spec)
    clip_err = block_sums((dequantize(quantize(w, qp), qp) - w) ** 2, (32, 1))
    rtn_err = block_sums((rtn.dequantize() - w) ** 2, (32, 1))
    assert np.all(clip_err <= rtn_err * (1 + 1e-6))
    assert clip_err.sum() < 0.98 * rtn_err.sum()
    rtn_range = block_reduce(w, (32, 1), np.max) - block_reduce(w, (32, 1), np.min)
    assert np.any(qp.scale * 15 < rtn_range * 0.99)  # some ranges were shrunk


def test_clip_output_error_mode_uses_activation_weights():
    rng = np.random.default_rng(1)
    k, n = 96, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((512, k)).astype(np.float32)
    x[:, :4] *= 20.0
    st = ActivationStats()
    st.update(x)
    spec = QuantSpec(3, (32, 1), True)
    h = st.hessian()
    weighted = ClipSearch(st).solve(w, spec)
    rtn = RTN().solve(w, spec)
    assert weighted.symmetric
    assert output_error(w, weighted.dequantize(), h) <= output_error(w, rtn.dequantize(), h)
