"""Streaming statistics of one activation tensor (a MatMul input ``[..., K]``), shared by every
weight that reads it: the Gram matrix ``X^T X`` (GPTQ's Hessian, and the exact output error of any
weight perturbation) and the mean absolute value per channel (AWQ's salience)."""

from __future__ import annotations

import os
import tempfile
import weakref

import numpy as np


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


BAND = 512  # rows of the K x K statistics updated at once (bounded temporaries at any K)


class ActivationStats:
    def __init__(self) -> None:
        self._gram: np.ndarray | None = None  # float64 [K, K], sum of x x^T over rows (see ``gram``)
        self._upper_stale = False  # only the lower triangle was accumulated since the last ``gram``
        self._spill = None  # the file holding the Gram matrix once released (``release_gram``)
        self.abs_sum: np.ndarray | None = None  # float64 [K]
        self.rows = 0
        self.cache: dict = {}  # solver by-products that depend only on these statistics

    @property
    def gram(self) -> np.ndarray | None:
        """``X^T X`` (float64, symmetric). Batches add to the lower triangle only (half the flops: a 7B
        down projection's statistics cost as much as running its layer); it is mirrored in place when
        read. Once released (``release_gram``), a copy read from its file: prefer ``bands``."""
        if self._spill is not None:
            return np.fromfile(self._spill_path, np.float64).reshape(self._spill_k, self._spill_k)
        return self._gram_in_memory()

    def _gram_in_memory(self) -> np.ndarray | None:
        if self._upper_stale:
            g = self._gram
            for i in range(0, g.shape[0], BAND):
                j = i + BAND
                g[:i, i:j] = g[i:j, :i].T
                diag_block = g[i:j, i:j]
                diag_block[:] = np.tril(diag_block) + np.tril(diag_block, -1).T
            self._upper_stale = False
        return self._gram

    def __getstate__(self) -> dict:  # a released Gram matrix travels as an array (no file handle, no finalizer)
        state = dict(self.__dict__)
        if self._spill is not None:
            state["_gram"], state["_spill"] = self.gram, None
        return state

    @gram.setter
    def gram(self, value: np.ndarray | None) -> None:
        self._gram, self._upper_stale = value, False

    def update(self, x: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add one batch ``[..., K]`` (rows are every leading index), optionally with a weight per row."""
        x = np.asarray(x, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])
        if self._spill is not None:  # more rows after a release: back in memory
            self._gram = self.gram
            self._spill()
            self._spill = None
        if self._gram is None:
            k = x.shape[1]
            self.gram = np.zeros((k, k), np.float64)
            self.abs_sum = np.zeros(k, np.float64)
        if weights is None:
            self._add_lower(x)
            self.abs_sum += np.abs(x).sum(0, dtype=np.float64)
            self.rows += x.shape[0]
        else:
            wt = np.asarray(weights, np.float32).reshape(-1, 1)
            self._add_lower(x * np.sqrt(wt))  # sum of w x x^T = (sqrt(w) x)^T (sqrt(w) x)
            self.abs_sum += (np.abs(x) * wt).sum(0, dtype=np.float64)
            self.rows += float(wt.sum())
        self.cache.clear()

    def _add_lower(self, x: np.ndarray) -> None:
        """``x^T x`` added to the lower triangle, a panel of BAND rows at a time: float32 products of
        [BAND, K] at most, added into the float64 matrix (``(x.T @ x).astype(float64)`` made a K x K
        float32 and a K x K float64 temporary: 1.45 GB at K = 11008; BLAS syrk still made the first)."""
        if not len(x):
            return
        # X^T X in float32 overflows once |x| passes ~1e19 (and a sum of many rows sooner): such a
        # batch is scaled to max |x| = 1 for the float32 product and scaled back in float64.
        peak = float(np.max(np.abs(x)))
        m = peak if np.isfinite(peak) and peak > 0 else 1.0  # NaN/Inf inputs stay visible in the result
        factor = m * m if m * m * len(x) > 1e30 else 1.0
        xs = x / np.float32(m) if factor != 1.0 else x
        g = self._gram
        for i in range(0, g.shape[0], BAND):
            j = min(i + BAND, g.shape[0])
            part = np.ascontiguousarray(xs[:, i:j]).T @ xs[:, :j]  # rows i..j of the lower triangle
            if factor == 1.0:
                g[i:j, :j] += part
            else:
                g[i:j, :j] += np.multiply(part, factor, dtype=np.float64)
        self._upper_stale = True

    @property
    def k(self) -> int:
        if self._spill is not None:
            return self._spill_k
        return 0 if self._gram is None else self._gram.shape[0]

    def hessian(self) -> np.ndarray:
        """``X^T X / rows`` (float64): the output error of ``W + D`` is ``trace(D^T H D)`` per row."""
        if self.gram is None or self.rows == 0:
            raise ValueError("no activations were observed")
        return self.gram / self.rows

    def normalizers(self) -> tuple[float, ...]:
        """The divisors that turn the Gram matrix into GPTQ's normalised Hessian: ``rows``, then the mean
        of ``diag(X^T X / rows)`` (skipped when it is 0 or 1), applied one after the other so that
        every consumer gets the same float64 numbers as ``hessian() / mean(diag)``."""
        scale = float(np.mean(self.diagonal()))
        return (self.rows, scale) if scale > 0 and scale != 1.0 else (self.rows,)

    def finite(self) -> bool:
        if "finite" not in self.cache:
            self.cache["finite"] = all(bool(np.all(np.isfinite(b))) for _, b in self.bands())
        return self.cache["finite"]

    def normalized32(self) -> np.ndarray:
        """``H / mean(diag H)`` in float32, cached; made a band of rows at a time from the Gram matrix,
        so the K x K float64 intermediate never exists (0.97 GB at K = 11008)."""
        if "h32" not in self.cache:
            divisors = self.normalizers()
            out = np.empty((self.k, self.k), np.float32)
            for i, band in self.bands():
                band = np.array(band)
                for d in divisors:
                    band /= d
                out[i:i + len(band)] = band
            self.cache["h32"] = out
        return self.cache["h32"]

    def output_error(self, w: np.ndarray, w_hat: np.ndarray) -> float:
        """``output_error(w, w_hat, hessian())`` a band of rows at a time (no K x K copy or mapping)."""
        d = np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)
        w = np.asarray(w, np.float64)
        noise = signal = 0.0
        for i, band in self.bands():
            rows = slice(i, i + len(band))
            noise += float(np.sum((band @ d) * d[rows]))
            signal += float(np.sum((band @ w) * w[rows]))
        return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))

    def release_gram(self) -> np.ndarray:
        """The float64 Gram matrix, handed to a caller that may overwrite it (GPTQ factorises it in
        place). These statistics keep it in a temporary file from then on, read a band of rows at a
        time (``bands``: the diagonal, the normalised H, the report's output error, a retry with more
        damping): the K x K float64 matrix is in memory once, not twice, and reading it back maps no
        pages for good. Released before: a float64 copy read from the file."""
        if self._spill is not None:
            return self.gram
        g = self.gram
        with tempfile.NamedTemporaryFile(prefix="onnxfgq-gram-", suffix=".f64", delete=False) as f:
            g.tofile(f)
        self._spill = weakref.finalize(self, _remove, f.name)
        self._spill_path, self._spill_k = f.name, g.shape[0]
        self._gram = None
        return g

    def bands(self, rows: int = BAND):
        """``(start, rows of the Gram matrix)`` a band at a time, from memory or from the released file."""
        if self._spill is None:
            g = self.gram
            for i in range(0, self.k, rows):
                yield i, g[i:i + rows]
            return
        k = self._spill_k
        for i in range(0, k, rows):
            n = min(rows, k - i)
            yield i, np.fromfile(self._spill_path, np.float64, count=n * k, offset=i * k * 8).reshape(n, k)

    def discard(self) -> None:
        """Forget the statistics now, and the file of a released Gram matrix with them."""
        self._gram = None
        self.cache.clear()
        if self._spill is not None:
            self._spill()
            self._spill = None

    def diagonal(self) -> np.ndarray:
        """``diag(hessian())`` without the K x K copy."""
        if "diag" not in self.cache:
            self.cache["diag"] = np.concatenate([np.diagonal(b, offset=i) for i, b in self.bands()])
        return self.cache["diag"] / self.rows

    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def rescale(self, s: np.ndarray) -> None:
        """In place, the statistics of ``x / s`` (``scaled`` without a second K x K matrix)."""
        inv = 1.0 / np.asarray(s, np.float64)
        g = self._gram_in_memory()
        if g is not None:
            g *= inv[:, None]
            g *= inv[None, :]
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum * inv
        self.cache.clear()

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
    dtype = np.float32 if h.dtype == np.float32 else np.float64  # never a float64 copy of a float32 H
    d = (np.asarray(w_hat, np.float64) - np.asarray(w, np.float64)).astype(dtype, copy=False)
    w = np.asarray(w, dtype)
    noise = float(np.sum((h @ d) * d, dtype=np.float64))
    signal = float(np.sum((h @ w) * w, dtype=np.float64))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))


def weight_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    """Relative weight error ``|W_hat - W|^2 / |W|^2``."""
    w = np.asarray(w, np.float64)
    d = np.asarray(w_hat, np.float64) - w
    signal = float(np.sum(w * w))
    noise = float(np.sum(d * d))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))
