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
# Above this many K^2 N flops per candidate the error is measured on SAMPLED_COLUMNS evenly spaced output
# columns of each weight (exact for group-wise and per-channel layouts, whose blocks are one column
# wide): a 7B down projection's exact search is 11 x 2 x K^2 N = 1e13 flops, the sample's 3e11.
EXACT_FLOPS = 1 << 34
SAMPLED_COLUMNS = 256


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
    """The shared input-channel scale for ``weights`` (each ``[K, N_i]``) that read one tensor.

    Large problems (over EXACT_FLOPS) are measured on a sample of output columns, with the float32
    Hessian built a band at a time (no float64 K x K copy)."""
    k = weights[0].shape[0] if weights else 0
    wide = k * k * sum(w.shape[1] for w in weights) > EXACT_FLOPS
    if wide and all(spec.block_shape[-1] == 1 for spec in specs):
        weights = [w[:, _evenly(w.shape[1], SAMPLED_COLUMNS)] for w in weights]
        h = stats.normalized32()  # relative errors: scale-free
    else:
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


def _evenly(n: int, m: int) -> np.ndarray:
    """``min(n, m)`` evenly spaced indices of ``range(n)``."""
    return np.unique(np.linspace(0, n - 1, min(n, m)).round().astype(np.int64))
