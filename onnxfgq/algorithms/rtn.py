"""Round to nearest over min/max ranges: the baseline every other algorithm must beat."""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.quant import compute_qparams, quantize


class RTN:
    needs_activations = False

    def observe(self, x: np.ndarray) -> None:  # RTN needs no statistics
        del x

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False)
        return QuantizedWeight(quantize(w, qp), qp)
