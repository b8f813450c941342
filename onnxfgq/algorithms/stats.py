"""Streaming statistics of one activation tensor (a MatMul input ``[..., K]``), shared by every
weight that reads it: the Gram matrix ``X^T X`` (GPTQ's Hessian, and the exact output error of any
weight perturbation) and the mean absolute value per channel (AWQ's salience)."""

from __future__ import annotations

import numpy as np


class ActivationStats:
    def __init__(self) -> None:
        self.gram: np.ndarray | None = None  # float64 [K, K], sum of x x^T over rows
        self.abs_sum: np.ndarray | None = None  # float64 [K]
        self.rows = 0
        self.cache: dict = {}  # solver by-products that depend only on these statistics

    def update(self, x: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add one batch ``[..., K]`` (rows are every leading index), optionally with a weight per row."""
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        if self.gram is None:
            k = x.shape[1]
            self.gram = np.zeros((k, k), np.float64)
            self.abs_sum = np.zeros(k, np.float64)
        # X^T X in float32 overflows once |x| passes ~1e19 (and a sum of many rows sooner): scale the
        # batch to max |x| = 1 for the float32 product and scale back in float64.
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        m = peak if np.isfinite(peak) and peak > 0 else 1.0  # NaN/Inf inputs stay visible in the result
        xs = x / np.float32(m) if m != 1.0 else x
        if weights is None:
            self.gram += (xs.T @ xs).astype(np.float64) * (m * m)
            self.abs_sum += np.abs(x).sum(0, dtype=np.float64)
            self.rows += x.shape[0]
        else:
            wt = np.asarray(weights, np.float32).reshape(-1, 1)
            self.gram += ((xs * wt).T @ xs).astype(np.float64) * (m * m)
            self.abs_sum += (np.abs(x) * wt).sum(0, dtype=np.float64)
            self.rows += float(wt.sum())
        self.cache.clear()

    @property
    def k(self) -> int:
        return 0 if self.gram is None else self.gram.shape[0]

    def hessian(self) -> np.ndarray:
        """``X^T X / rows`` (float64): the output error of ``W + D`` is ``trace(D^T H D)`` per row."""
        if self.gram is None or self.rows == 0:
            raise ValueError("no activations were observed")
        return self.gram / self.rows

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def scaled(self, s: np.ndarray) -> ActivationStats:
        """Statistics of ``x / s`` (after an AWQ scale ``s`` was folded into the producer)."""
        out = ActivationStats()
        inv = 1.0 / np.asarray(s, np.float64)
        out.gram = self.gram * inv[:, None] * inv[None, :]
        out.abs_sum = self.abs_sum * inv
        out.rows = self.rows
        return out


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Relative output error ``|X (W_hat - W)|^2 / |X W|^2`` from ``H = X^T X / n``."""
    d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
    w = np.asarray(w, np.float64)
    noise = float(np.sum((h @ d) * d))
    signal = float(np.sum((h @ w) * w))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))


def weight_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative weight error ``|W_hat - W|^2 / |W|^2``."""
    w = np.asarray(w, np.float64)
    d = np.asarray(w_hat, np.float64) - w
    signal = float(np.sum(w * w))
    noise = float(np.sum(d * d))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))
