"""Empirical-statistics bias correction (Nagel et al. 2019, section 4.2; Finkelstein et al. 2019):
quantizing a weight shifts the layer's expected output by ``(W_q - W) E[x]``; subtracting that shift
from the bias removes the systematic part of the error. ``E[x]`` per input channel comes from
calibration (one running mean per channel: bounded memory). Padding is ignored (border pixels see
zeros instead of the mean), which is why this is a correction, not an identity.
"""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.cle import in_channel_index


def output_shift(w: np.ndarray, w_q: np.ndarray, mean_x: np.ndarray, group: int = 1) -> np.ndarray:
    """``E[y_q - y]`` per output channel for a Conv (``[out, in / group, *k]``) or, with ``w`` of rank 2
    laid out ``[out, in]``, a fully connected layer; ``mean_x`` holds one mean per input channel."""
    err = (np.asarray(w_q, np.float64) - np.asarray(w, np.float64))
    out, in_per_group = err.shape[0], err.shape[1]
    idx = in_channel_index(out, in_per_group, group)
    m = np.asarray(mean_x, np.float64).reshape(-1)[idx]  # [out, in_per_group]
    return (err.reshape(out, in_per_group, -1).sum(axis=2) * m).sum(axis=1)


def corrected_bias(bias: np.ndarray | None, w: np.ndarray, w_q: np.ndarray, mean_x: np.ndarray,
                   group: int = 1) -> np.ndarray:
    """The bias that cancels the expected output shift of quantizing ``w`` to ``w_q``."""
    shift = output_shift(w, w_q, mean_x, group)
    b = np.zeros(shift.shape) if bias is None else np.asarray(bias, np.float64).reshape(-1)
    return (b - shift).astype(np.float32)
