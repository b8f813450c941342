"""Clipping search: shrink each block's range by the ratio that minimises its quantization error.

Outliers stretch a block's min/max grid over values that rarely occur; a smaller range rounds the
bulk of the block more finely and clips the few outliers. The error is the plain weight error, or,
with activation statistics, the diagonal approximation of the output error (each input row of the
weight weighted by the mean square of its activation, ``diag(X^T X) / n``).
"""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.quant import QParams, compute_qparams, dequantize, num_blocks, quantize

RATIOS = tuple(np.round(np.linspace(1.0, 0.55, 10), 3))


def block_sums(x: np.ndarray, block_shape: tuple[int, ...]) -> np.ndarray:
    """Sum of ``x`` over each block (short trailing blocks padded with zeros)."""
    bs = tuple(min(b, d) for b, d in zip(block_shape, x.shape))
    nb = num_blocks(x.shape, bs)
    pad = [(0, n * b - d) for n, b, d in zip(nb, bs, x.shape)]
    if any(p[1] for p in pad):
        x = np.pad(x, pad)
    split: list[int] = []
    for n, b in zip(nb, bs):
        split += [n, b]
    return x.reshape(split).sum(axis=tuple(range(1, 2 * x.ndim, 2)))


def search_qparams(w: np.ndarray, spec: QuantSpec, row_weight: np.ndarray | None = None,
                   ratios: tuple[float, ...] = RATIOS) -> QParams:
    """Per-block clip ratio (from ``ratios``) minimising the (row-weighted) squared error."""
    w = np.asarray(w, np.float32)
    best_err = best_ratio = None
    rw = None if row_weight is None else np.asarray(row_weight, np.float32).reshape(-1, 1)
    for r in ratios:
        qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False,
                             clip_ratio=float(r))
        d = dequantize(quantize(w, qp), qp) - w
        d2 = d * d if rw is None else d * d * rw
        err = block_sums(d2, spec.block_shape)
        if best_err is None:
            best_err, best_ratio = err, np.full(err.shape, r, np.float32)
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_ratio = np.where(better, np.float32(r), best_ratio)
    return compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False,
                           clip_ratio=best_ratio)


class ClipSearch:
    """RTN on searched per-block ranges (weight error, or output error when activations were seen)."""

    needs_activations = False  # activations help (output-error weighting) but are optional

    def __init__(self, stats: ActivationStats | None = None):
        self.stats = stats if stats is not None else ActivationStats()

    def observe(self, x: np.ndarray) -> None:
        self.stats.update(x)

    def row_weight(self) -> np.ndarray | None:
        return self.stats.diagonal() if self.stats.rows else None

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        qp = search_qparams(w, spec, self.row_weight())
        return QuantizedWeight(quantize(w, qp), qp)
