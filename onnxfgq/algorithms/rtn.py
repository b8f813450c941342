"""Round to nearest over min/max ranges: the baseline every other algorithm must beat."""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.quant import QParams, compute_qparams, dequantize, quantize
from onnxfgq.quant.core import error_sums, sqnr_from


class RTN:
    needs_activations = False

    def observe(self, x: np.ndarray) -> None:  # RTN needs no statistics
        del x

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False)
        return QuantizedWeight(quantize(w, qp), qp)


SLICE_COLUMNS = 2048  # output columns quantized at once by ``solve_with_sqnr``


def solve_with_sqnr(w: np.ndarray, spec: QuantSpec, columns: int = SLICE_COLUMNS) -> tuple[QuantizedWeight, float]:
    """RTN and the weight's SQNR, a slice of output columns at a time where blocks are one column wide:
    the float temporaries (the scaled copy, the dequantized copy) are a slice's, not the weight's (a
    7B lm_head's would be 1 GB more at its peak). The same codes and qparams as ``RTN().solve``."""
    n = w.shape[1] if w.ndim == 2 else 0
    if w.ndim != 2 or spec.block_shape[1] != 1 or n <= columns:
        qw = RTN().solve(w, spec)
        return qw, sqnr_from(*error_sums(w, qw.dequantize()))
    parts, signal, noise = [], 0.0, 0.0
    for j in range(0, n, columns):
        part = np.ascontiguousarray(w[:, j:j + columns])
        q = RTN().solve(part, spec)
        s, e = error_sums(part, dequantize(q.codes, q.qparams))
        signal, noise = signal + s, noise + e
        parts.append(q)
    qp = parts[0].qparams
    qparams = QParams(np.concatenate([p.qparams.scale for p in parts], axis=1),
                      np.concatenate([p.qparams.zero_point for p in parts], axis=1), qp.block_shape, qp.qr)
    return QuantizedWeight(np.concatenate([p.codes for p in parts], axis=1), qparams), sqnr_from(signal, noise)
