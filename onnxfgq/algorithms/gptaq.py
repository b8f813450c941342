"""GPTAQ-style asymmetric calibration (Li et al., 2025): GPTQ whose target is the *float* model's output.

Block by block (``--engine blocks``) a layer's inputs ``X~`` come from the already quantized blocks,
while the float model feeds it ``X``. Plain GPTQ minimises ``|X~ (Q - W)|^2``: it makes the layer
faithful to its own weights on the inputs it now gets, and leaves the error the earlier blocks put
into ``X~`` as it is. Asymmetric calibration minimises ``|X~ Q - X W|^2`` instead, so each layer also
undoes part of the error accumulated before it.

With ``H = X~^T X~ / n`` and the cross Gram ``C = X~^T X / n`` that objective is, up to a constant,
``(Q - W*)^T H (Q - W*)`` with ``W* = W + H^-1 (C - H) W`` (the unconstrained least-squares answer).
``C - H = X~^T (X - X~) / n`` is accumulated as that product of the inputs' *difference*: a small
difference of two large Gram matrices accumulated separately in float32 is mostly rounding noise
where the paths are close (37% of its size at a 1e-5 perturbation), which ``H^-1`` then amplifies.
So GPTAQ is GPTQ (same Hessian, same row order, same OBS updates, same scale refit) run on the
target ``W*``: every step keeps the rows not yet quantized at their exact conditional optimum of the
asymmetric objective. The inverse is damped like GPTQ's (``H + damp * mean(diag H) * I``, a ridge that
pulls ``W*`` towards ``W``), and ``alpha`` in [0, 1] moves the target only part of the way
(``W + alpha (W* - W)``). ``W*`` is a regression with K inputs: fitted on a few rows per input it
also fits noise (on MiniLM, 580 sentences, alpha = 1 lowered the cosine to FP32 from 0.9920 to 0.9871
while alpha = 0.25 raised it to 0.9932). By default alpha is chosen per weight on held-out rows: the
correction fitted on the even-numbered calibration batches is scored on the odd ones and vice versa.
"""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.gptq import GPTQ
from onnxfgq.algorithms.stats import ActivationStats


class PairedStats(ActivationStats):
    """``ActivationStats`` of the quantized path's inputs ``X~`` plus the shift ``X~^T (X - X~)`` towards
    the float model's inputs ``X`` for the same rows (same tokens, same weights); the cross Gram
    ``X~^T X`` is the Gram matrix plus the shift."""

    def __init__(self) -> None:
        super().__init__()
        self.shift: np.ndarray | None = None  # float64 [K, K], sum of x~ (x - x~)^T over rows
        # the odd-numbered batches' share of gram / shift / rows: two halves of the data, to choose how
        # far to move towards the target on rows it was not fitted on (``held_out_alpha``)
        self.odd = ActivationStats()
        self.odd_shift: np.ndarray | None = None
        self.pairs = 0

    def update_pair(self, x_quant: np.ndarray, x_float: np.ndarray, weights: np.ndarray | None = None) -> None:
        xq = np.asarray(x_quant, np.float32).reshape(-1, np.shape(x_quant)[-1])
        xf = np.asarray(x_float, np.float32).reshape(-1, np.shape(x_float)[-1])
        if xq.shape != xf.shape:
            raise ValueError(f"paired inputs differ in shape: {xq.shape} vs {xf.shape}")
        self.update(xq, weights)
        if self.shift is None:
            self.shift = np.zeros((xq.shape[1],) * 2, np.float64)
            self.odd_shift = np.zeros_like(self.shift)
        # each side scaled to max |x| = 1 for the float32 product (no overflow at any scale)
        diff = xf - xq
        mq, md = (_peak(x) for x in (xq, diff))
        a, b = xq / np.float32(mq), diff / np.float32(md)
        if weights is not None:
            a = a * np.asarray(weights, np.float32).reshape(-1, 1)
        shift = (a.T @ b).astype(np.float64) * (mq * md)
        self.shift += shift
        if self.pairs % 2:
            self.odd.update(xq, weights)
            self.odd_shift += shift
        self.pairs += 1
        self.cache.clear()

    def release_gram(self) -> np.ndarray:
        """A float64 copy: the corrections and the held-out alpha read the float64 Gram matrix later."""
        return self.gram.copy()

    def shift_hessian(self) -> np.ndarray:
        """``C - H = X~^T (X - X~) / rows`` (float64)."""
        if self.shift is None or self.rows == 0:
            raise ValueError("no paired activations were observed")
        return self.shift / self.rows

    def cross_hessian(self) -> np.ndarray:
        """``C = X~^T X / rows`` (float64)."""
        return self.hessian() + self.shift_hessian()

    def halves(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(H, C - H)`` of the even- and of the odd-numbered batches (empty with fewer than two batches)."""
        odd_rows = self.odd.rows
        even_rows = self.rows - odd_rows
        if odd_rows <= 0 or even_rows <= 0:
            return []
        og, os_ = self.odd.gram, self.odd_shift
        return [((self.gram - og) / even_rows, (self.shift - os_) / even_rows), (og / odd_rows, os_ / odd_rows)]


def _peak(x: np.ndarray) -> float:
    m = float(np.max(np.abs(x))) if x.size else 0.0
    return m if np.isfinite(m) and m > 0 else 1.0


def asymmetric_correction(h: np.ndarray, shift: np.ndarray, damp: float) -> np.ndarray:
    """``M = (H + damp * mean(diag H) * I)^-1 (C - H)`` (float64 ``[K, K]``) from ``H`` and
    ``shift = C - H``: ``W* = W + M W``.
    One per input tensor (q, k and v share it). Channels that never fire on the quantized path
    (``H_kk == 0``) get no correction: nothing in ``X~`` can carry it."""
    from scipy.linalg import cho_factor, cho_solve

    h = np.asarray(h, np.float64)
    k = h.shape[0]
    dead = np.diag(h) == 0
    lam = damp * (float(np.mean(np.diag(h))) or 1.0)
    a = h.copy()
    a.flat[::k + 1] += lam
    rhs = np.array(shift, np.float64)
    rhs[dead, :] = 0.0
    m = cho_solve(cho_factor(a, lower=False, check_finite=False), rhs, check_finite=False)
    m[dead, :] = 0.0
    return m


class GPTAQ(GPTQ):
    """GPTQ on the asymmetric target ``W + alpha * M W`` (module docstring). Falls back to plain GPTQ
    when the statistics are not paired or are unusable (non-finite, fewer rows than inputs: the
    least-squares correction would fit noise). The held-out alpha is chosen per weight: a weight solved
    in column slices (``ColumnChunks``) gets its alpha from the whole weight (``for_weight``)."""

    def __init__(self, stats: PairedStats | None = None, *, alpha: float | None = None, damp: float = 0.01,
                 act_order: bool = True, clip: bool = False, refit: bool = True):
        super().__init__(stats if stats is not None else PairedStats(), damp=damp, act_order=act_order,
                         clip=clip, refit=refit)
        self.alpha = alpha

    def _usable(self) -> bool:
        st = self.stats
        return self.alpha != 0 and getattr(st, "shift", None) is not None and st.rows >= st.k

    def _correction(self) -> np.ndarray | None:
        """``M`` (float32), cached; computed from the float64 statistics, so before GPTQ's factorisation
        takes the Gram matrix over (``warm``)."""
        st = self.stats
        key = ("gptaq", self.damp)
        if key not in st.cache:
            h, s = st.hessian(), st.shift_hessian()
            ok = np.all(np.isfinite(h)) and np.all(np.isfinite(s))
            st.cache[key] = asymmetric_correction(h, s, self.damp).astype(np.float32) if ok else None
        return st.cache[key]

    def _half_corrections(self) -> list[np.ndarray]:
        st = self.stats
        key = ("gptaq-halves", self.damp)
        if key not in st.cache:
            st.cache[key] = [asymmetric_correction(h, s, self.damp).astype(np.float32) for h, s in st.halves()]
        return st.cache[key]

    def warm(self) -> None:
        """What the weights of these statistics share, computed once before slices solve on threads."""
        if self._usable():
            self._correction()
            if self.alpha is None:
                self._half_corrections()
        super().warm()

    def for_weight(self, w: np.ndarray) -> GPTAQ:
        """This solver with ``w``'s held-out alpha fixed, for solving slices of ``w`` with one alpha."""
        if self.alpha is not None or not self._usable() or self._correction() is None:
            return self
        return GPTAQ(self.stats, alpha=self.held_out_alpha(w), damp=self.damp, act_order=self.act_order,
                     clip=self.clip, refit=self.refit)

    def held_out_alpha(self, w: np.ndarray) -> float:
        """The ``alpha`` in [0, 1] that best carries the correction fitted on one half of the batches to
        the other half (both ways): ``E(a) = |X~_B (W + a M_A W) - X_B W|^2`` is quadratic in ``a``.
        Fitted on half the rows, ``M_A`` is noisier than ``M``: the choice errs on the cautious side."""
        halves = self.stats.halves()
        if len(halves) != 2:
            return 0.0
        w = np.asarray(w, np.float32)
        num = den = 0.0
        for m, (h, s) in zip(self._half_corrections(), reversed(halves)):
            d = (m @ w).astype(np.float64)
            num += float(np.sum(d * (s @ w)))
            den += float(np.sum(d * (h @ d)))
        return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0

    def target(self, w: np.ndarray) -> tuple[np.ndarray, float | None]:
        """The weight GPTQ is asked to reproduce on ``X~``, and the alpha that made it (None: not moved)."""
        if not self._usable():
            return w, None
        m = self._correction()
        if m is None:
            return w, None
        w = np.asarray(w, np.float32)
        alpha = self.held_out_alpha(w) if self.alpha is None else self.alpha
        return w + np.float32(alpha) * (m @ w), alpha

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        target, alpha = self.target(w)
        q = super().solve(target, spec)
        said = f"GPTAQ alpha {alpha:.2f}" if alpha is not None else "GPTAQ off (unpaired or too few rows)"
        return QuantizedWeight(q.codes, q.qparams, "; ".join(x for x in (q.note, said) if x))
