"""AWQ (Lin et al., 2023): scale the input channels of a weight by ``s = mean|x|^alpha`` before
quantizing, and divide the activations by ``s`` (folded into the producer by a graph pass), so that
the channels that carry large activations are rounded more finely.

One ``s`` serves every weight that reads the same tensor (q, k and v after one LayerNorm); ``alpha``
is searched on a grid to minimise the summed relative *output* error of those weights, computed
exactly from the input's ``H = X^T X / n`` (no activations are kept). ``alpha = 0`` is plain RTN,
so the search never does worse than RTN on the calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.quant import compute_qparams, dequantize, quantize

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


@dataclass(frozen=True)
class AWQScale:
    scale: np.ndarray  # float32 [K]: weights are multiplied by it row-wise, activations divided
    alpha: float
    error: float  # summed relative output error of the group at the chosen alpha
    rtn_error: float  # the same at alpha = 0


def _rtn(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False)
    return dequantize(quantize(w, qp), qp)


def _relative_output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    d = w_hat - w
    signal = float(np.sum((h @ w) * w))
    return float(np.sum((h @ d) * d)) / signal if signal > 0 else 0.0


def search_scale(weights: Sequence[np.ndarray], specs: Sequence[QuantSpec], stats: ActivationStats, *,
                 alphas: Sequence[float] = ALPHAS,
                 fake_quant: Callable[[np.ndarray, QuantSpec], np.ndarray] = _rtn) -> AWQScale:
    """The shared input-channel scale for ``weights`` (each ``[K, N_i]``) that read one tensor."""
    h = stats.hessian()
    peak = float(np.max(np.abs(np.diag(h)))) if h.size else 0.0
    h = (h / peak if np.isfinite(peak) and peak > 0 else h).astype(np.float32)  # relative errors: scale-free
    salience = np.maximum(stats.mean_abs(), 1e-8)
    best: tuple[float, float, np.ndarray] | None = None
    rtn_error = float("nan")
    for alpha in alphas:
        s = salience ** float(alpha)
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
        err = 0.0
        for w, spec in zip(weights, specs):
            w_hat = fake_quant(w * s[:, None], spec) / s[:, None]
            err += _relative_output_error(w, w_hat, h)
        if alpha == 0:
            rtn_error = err
        if best is None or err < best[0]:
            best = (err, float(alpha), s)
    assert best is not None
    return AWQScale(best[2], best[1], best[0], rtn_error)
