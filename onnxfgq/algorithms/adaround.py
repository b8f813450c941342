"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"):
round each weight up or down so that the layer's *output* error on calibration data is smallest,
instead of rounding every weight to its nearest grid point independently.

For a linear layer (a Conv is one on its im2col patches) the output error of a weight perturbation
``D`` (``[N, K]``, one row per output channel) is exactly ``sum_n D_n H D_n^T`` with
``H = E[x x^T]`` over the input rows, so the objective needs only ``H``: one ``K x K`` matrix per
group, accumulated batch by batch from a bounded sample of patches (:class:`GroupGram`). Rows are
independent problems that share ``H``; they are solved together with Adam on the exact gradient of
the relaxed objective (rectified-sigmoid soft rounding pushed to 0/1 by the annealed regulariser of
the paper), then rounded hard. A row keeps nearest rounding wherever that scores better, so the
result is never worse than round-to-nearest on the objective. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (the paper's values): h reaches 0 and 1 exactly


@dataclass(frozen=True)
class AdaRoundOptions:
    # Tuned on random correlated layers (K 32-240, 8 bits): 300 steps at 0.03 reach within 2% of 3000 at
    # 0.01; a regulariser weight of 0.3-3 halves the output error of nearest rounding, 0.01 (the
    # paper's, for its unnormalised loss) only takes 15-20% off it.
    iterations: int = 300
    learning_rate: float = 0.03
    reg: float = 1.0  # weight of the rounding regulariser against the (normalised) output error
    warmup: float = 0.2  # fraction of iterations without the regulariser
    beta: tuple[float, float] = (20.0, 2.0)  # the regulariser's exponent, annealed from first to last


def conv_patches(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                 dilations: tuple[int, int], group: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Input patches ``[rows, group, C / group * kh * kw]`` of a 2-D Conv (ONNX ``pads`` order: top, left,
    bottom, right), at up to ``max_rows`` output positions drawn without replacement: memory is bounded by
    ``max_rows`` patches whatever the batch and image size."""
    b, c, hgt, wid = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    pt, pl, pb, pr = pads
    ho = (hgt + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (wid + pl + pr - dw * (kw - 1) - 1) // sw + 1
    n = b * ho * wo
    idx = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    bi, rem = np.divmod(idx, ho * wo)
    oi, oj = np.divmod(rem, wo)
    xp = np.pad(np.asarray(x, np.float32), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rows = oi[:, None] * sh + np.arange(kh) * dh  # [n, kh]
    cols = oj[:, None] * sw + np.arange(kw) * dw  # [n, kw]
    p = xp[bi[:, None, None, None], np.arange(c)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return p.reshape(len(idx), group, (c // group) * kh * kw)


class GroupGram:
    """Running ``sum x x^T`` per group over rows ``[n, G, K]`` (float64): ``G K^2`` numbers of state."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.rows = 0

    def update(self, rows: np.ndarray) -> None:
        r = np.asarray(rows, np.float32)
        r = np.where(np.isfinite(r), r, 0.0)  # one NaN would poison every rounding decision of the layer
        g = np.matmul(r.transpose(1, 2, 0), r.transpose(1, 0, 2)).astype(np.float64)  # [G, K, K]
        self.gram = g if self.gram is None else self.gram + g
        self.rows += r.shape[0]

    def hessian(self) -> np.ndarray:
        if self.gram is None or not self.rows:
            raise ValueError("GroupGram: no rows observed")
        return self.gram / self.rows


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Relative output error ``sum_n D_n H_g D_n^T / sum_n W_n H_g W_n^T`` (``w`` ``[N, K]``, ``h``
    ``[G, K, K]``, row ``n`` in group ``n // (N / G)``)."""
    d = _grouped(np.asarray(w_hat, np.float64) - np.asarray(w, np.float64), h.shape[0])
    wg = _grouped(np.asarray(w, np.float64), h.shape[0])
    noise = float(np.sum(np.matmul(d, h) * d))
    signal = float(np.sum(np.matmul(wg, h) * wg))
    return noise / signal if signal > 0 else (0.0 if noise == 0 else float("inf"))


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    return a.reshape(groups, a.shape[0] // groups, a.shape[1])


def _soft(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rectified sigmoid ``h(V)`` in [0, 1] and its derivative (0 where clipped)."""
    s = 1.0 / (1.0 + np.exp(-v))
    raw = s * (ZETA - GAMMA) + GAMMA
    inside = (raw > 0) & (raw < 1)
    return np.clip(raw, 0.0, 1.0), np.where(inside, s * (1 - s) * (ZETA - GAMMA), 0.0)


def _row_loss(e: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``e_n H e_n^T`` per row of grouped errors ``[G, R, K]`` -> ``[G, R]``."""
    return np.sum(np.matmul(e, h) * e, axis=2)


def adaround(w: np.ndarray, scale: np.ndarray, h: np.ndarray, qmin: int, qmax: int,
             options: AdaRoundOptions = AdaRoundOptions()) -> np.ndarray:
    """Integer codes ``[N, K]`` for ``w`` ``[N, K]`` with one ``scale`` per row (zero point 0), chosen to
    minimise the output error under ``h`` ``[G, K, K]`` (``N`` a multiple of ``G``)."""
    w = np.asarray(w, np.float64)
    groups = h.shape[0]
    if w.shape[0] % groups or h.shape[1:] != (w.shape[1], w.shape[1]):
        raise ValueError(f"weight {w.shape} does not fit {groups} groups of H {h.shape[1:]}")
    # Integer units per row and H normalised per group: every row weighs the regulariser alike.
    diag = np.einsum("gkk->g", h) / h.shape[1]
    hn = (h / np.where(diag > 0, diag, 1.0)[:, None, None]).astype(np.float32)
    t = _grouped(w / np.asarray(scale, np.float64).reshape(-1, 1), groups)
    base = np.floor(t)
    nearest = np.clip(np.round(t), qmin, qmax)
    rest = (t - base).astype(np.float32)
    v = -np.log((ZETA - GAMMA) / (np.clip(rest, 1e-3, 1 - 1e-3) - GAMMA) - 1.0)  # h(V) = rest at the start
    v = v.astype(np.float32)
    free = ((base + 1 <= qmax) & (base >= qmin)).astype(np.float32)  # both neighbours on the grid
    t32, base32 = t.astype(np.float32), base.astype(np.float32)
    m, s = np.zeros_like(v), np.zeros_like(v)
    n_el = v.size
    warm = int(options.warmup * options.iterations)
    for it in range(options.iterations):
        soft, dsoft = _soft(v)
        e = t32 - np.clip(base32 + soft, qmin, qmax)
        grad = -2.0 * np.matmul(e, hn) / n_el  # d(mean output error) / d soft
        if it >= warm:
            frac = (it - warm) / max(1, options.iterations - warm)
            beta = options.beta[0] + (options.beta[1] - options.beta[0]) * frac
            u = 2 * soft - 1
            grad -= options.reg * beta * np.abs(u) ** (beta - 1) * np.sign(u) * 2 / n_el
        g = grad * dsoft * free
        m = 0.9 * m + 0.1 * g
        s = 0.999 * s + 0.001 * g * g
        step = options.learning_rate * (m / (1 - 0.9 ** (it + 1))) / (np.sqrt(s / (1 - 0.999 ** (it + 1))) + 1e-8)
        v -= step
    codes = np.clip(base + (_soft(v)[0] >= 0.5), qmin, qmax)
    better = _row_loss(t - codes, hn) <= _row_loss(t - nearest, hn)
    codes = np.where(better[..., None], codes, nearest)
    return codes.reshape(w.shape).astype(np.int32)
