"""GPTQ (Frantar et al., 2022): quantize the input rows of ``W [K, N]`` one at a time and push each
row's rounding error onto the rows not yet quantized, through the inverse Hessian ``H = X^T X / n``
of the layer's input, so that the layer's *output* error on the calibration data stays small.

- Dampening: ``H + damp * mean(diag H) * I`` keeps the Cholesky factorisation well conditioned;
  channels that never fire (``H_kk == 0``) are zeroed and left out of the update.
- Lazy blocks: errors are applied inside a block of ``block_rows`` rows eagerly and to the rest
  of the matrix once per block (one matrix product), which is where the time goes.
- Act-order with static groups: rows are processed most salient (largest ``H_kk``) first, while
  each group's qparams are computed up front from the original weights in their stored order, so
  the result is a plain per-group weight (no ``g_idx``) that MatMulNBits and DequantizeLinear read
  as is. (``group_act_order`` is a variant that keeps groups contiguous; see ``gptq``.)
- Any shape: groups are ``row // block`` and the last group may be short.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.clip import search_qparams
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.quant import QParams, compute_qparams, expand_blocks
from onnxfgq.quant.core import code_dtype

DAMPING_STEPS = (1, 10, 100, 1000, 10**4, 10**6)  # times the requested dampening, tried in order


def _row_params(qp: QParams, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point expanded to every element of ``[K, N]`` (float32)."""
    return (expand_blocks(qp.scale, shape, qp.block_shape).astype(np.float32),
            expand_blocks(qp.zero_point, shape, qp.block_shape).astype(np.float32))


def _inverse_hessian_chol(h: np.ndarray, damp: float, perm: np.ndarray, dead: np.ndarray,
                          divisors: tuple[float, ...] = (), overwrite: bool = False,
                          fallback: Callable[[], np.ndarray] | None = None) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H' + damp*mean(diag)*I)^-1`` (``U^T U``) with
    ``H' = H[perm][:, perm] / divisors`` (dead channels' diagonal set to 1), float32, retrying with more
    damping.

    One factorisation and one triangular inverse (``2/3 K^3`` flops) instead of the textbook
    Cholesky, inverse and second Cholesky (``4/3 K^3``): with ``J`` the reversal permutation and
    ``J A J = L L^T`` (lower Cholesky of the reversed matrix), ``A = R R^T`` with ``R = J L J`` upper
    triangular, so ``A^-1 = (R^-1)^T R^-1`` and ``U = R^-1 = J L^-1 J`` (the factor is unique). At
    K = 11008 (a 7B model's down projection) the textbook route is ~1.8 Tflop of float64.

    Memory: one float64 ``K x K`` working copy besides ``h``, factorised and inverted in place
    (LAPACK's potrf/trtri), then the float32 result. Dividing the permuted copy in place by
    ``divisors`` gives the same numbers as permuting ``h / divisors`` without that second copy. With
    ``overwrite`` the first attempt permutes ``h`` itself in place (no copy at all: 0.97 GB less at
    K = 11008); a retry with more damping then starts from ``fallback()`` (``h`` read again).
    """
    from scipy.linalg import lapack

    k = h.shape[0]
    live = ~dead
    diag = np.diag(h).copy()
    for d in divisors:
        diag /= d
    mean_diag = float((diag[live].sum() + dead.sum()) / k) or 1.0
    rev = perm[::-1]
    dead_rows = np.flatnonzero(dead[rev])
    for attempt, factor in enumerate(DAMPING_STEPS):
        if attempt == 0 and overwrite:
            work = _permute_symmetric(h, rev).T
        elif overwrite and fallback is None:
            break
        else:  # J H' J; symmetric, so its transpose is the Fortran-ordered array
            work = np.asarray((fallback() if overwrite else h)[np.ix_(rev, rev)], np.float64).T
        for d in divisors:
            work /= d
        work[dead_rows, dead_rows] = 1.0
        work.flat[::k + 1] += damp * factor * mean_diag
        chol, info = lapack.dpotrf(work, lower=True, overwrite_a=True, clean=False)
        if info != 0:
            continue
        inverse, info = lapack.dtrtri(chol, lower=True, overwrite_c=True)  # reads the lower triangle only
        if info != 0:
            continue
        del work, chol
        upper = inverse[::-1, ::-1].astype(np.float32)  # J L^-1 J: upper triangular
        del inverse
        for i in range(1, k):  # the strict lower part holds the input's leftovers (in rows: no K x K mask)
            upper[i, :i] = 0.0
        if np.all(np.isfinite(np.diagonal(upper))):
            return upper
    raise np.linalg.LinAlgError(f"the Hessian is not positive definite even with {DAMPING_STEPS[-1]}x dampening")


def _permute_symmetric(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``a[p][:, p]`` written into ``a`` itself, with one row of temporary memory."""
    for i in range(a.shape[0]):  # columns, a row at a time
        a[i] = a[i, p]
    done = np.zeros(len(p), bool)
    for start in range(len(p)):  # rows, one cycle of the permutation at a time: new[j] = old[p[j]]
        if done[start]:
            continue
        first, j = a[start].copy(), start
        while True:
            done[j] = True
            if p[j] == start:
                a[j] = first
                break
            a[j] = a[p[j]]
            j = p[j]
    return a


def row_order(diag_h: np.ndarray, order: str, block: int) -> np.ndarray:
    """Processing order of the rows: ``none`` (as stored), ``act`` (decreasing ``H_kk``), or ``group``
    (groups of ``block`` rows by decreasing total ``H_kk``, rows by decreasing ``H_kk`` inside each:
    act-order that keeps every group's rows together)."""
    k = len(diag_h)
    if order == "none":
        return np.arange(k)
    if order == "act":
        return np.argsort(-diag_h, kind="stable")
    groups = [np.arange(g, min(g + block, k)) for g in range(0, k, block)]
    groups.sort(key=lambda rows: -float(diag_h[rows].sum()))
    return np.concatenate([rows[np.argsort(-diag_h[rows], kind="stable")] for rows in groups])


def prepare(h: np.ndarray, *, damp: float, order: str = "act", block: int = 0, divisors: tuple[float, ...] = (),
            overwrite: bool = False, fallback: Callable[[], np.ndarray] | None = None):
    """What GPTQ needs from a Hessian ``h / divisors`` (``h`` may be the statistics' Gram matrix), shared
    by every weight that reads the same input: (dead input channels, row order, upper Cholesky factor
    of the damped inverse in that order). ``h`` is read only, unless ``overwrite`` hands it over (see
    ``_inverse_hessian_chol``)."""
    h = np.asarray(h, dtype=np.float64)
    diag = np.diag(h).copy()
    for d in divisors:
        diag /= d
    dead = diag == 0
    diag[dead] = 1.0
    perm = row_order(diag, order, block or h.shape[0])
    return dead, perm, _inverse_hessian_chol(h, damp, perm, dead, divisors, overwrite, fallback)


def _segments(perm: np.ndarray, block: int, block_rows: int, whole_groups: bool) -> list[tuple[int, int]]:
    """Lazy-update blocks over processing positions; with ``whole_groups`` they never split a group."""
    k = len(perm)
    if not whole_groups:
        return [(i, min(i + block_rows, k)) for i in range(0, k, block_rows)]
    group = perm // block
    cuts = [0] + [i for i in range(1, k) if group[i] != group[i - 1]] + [k]
    segs, start = [], 0
    for c in cuts[1:]:
        if c - start >= block_rows or c == k:
            segs.append((start, c))
            start = c
    return segs


def gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec, *, damp: float = 0.01, act_order: bool = True,
         clip: bool = False, block_rows: int = 128, prepared=None, group_act_order: bool = False) -> QuantizedWeight:
    """Quantize ``w [K, N]`` given the input Hessian ``h [K, K]`` (or its ``prepare``d form).

    Act-order uses static groups: qparams from the original weights, group membership as stored
    (plain per-group output, no ``g_idx``). ``group_act_order`` instead keeps each group's rows
    together (groups by total salience), which allows dynamic group qparams computed when the group
    starts; on MiniLM it measured slightly worse (cosine 0.9875 vs 0.9896 with clip), so it is opt-in.
    Without act-order, rows run in stored order with dynamic group qparams (the original GPTQ).
    """
    w = np.array(w, dtype=np.float32)
    k, n = w.shape
    bk, bn = spec.block_shape
    grouped = bn == 1 and bk < k
    order = ("group" if grouped and group_act_order else "act") if act_order else "none"
    dynamic = grouped and order != "act"
    dead, perm, u = prepared if prepared is not None else prepare(h, damp=damp, order=order, block=bk)
    w[dead, :] = 0.0
    diag_h = np.diag(h) if clip else None  # the clipping search's row weights

    def qparams(x: np.ndarray, s: QuantSpec, rows: np.ndarray | None = None):
        if clip:
            return search_qparams(x, s, diag_h if rows is None else diag_h[rows])
        return compute_qparams(x, s.block_shape, s.bits, symmetric=s.symmetric, signed=False)

    qp = qparams(w, spec)  # static qparams from the (dead-zeroed) original weights
    scale, zero = _row_params(qp, (k, n))
    group_scale, group_zero = qp.scale.copy(), qp.zero_point.copy()
    qmax = float(qp.qr.qmax)
    w, scale, zero = w[perm], scale[perm], zero[perm]
    codes = np.empty((k, n), np.float32)
    group = perm // bk
    for i1, i2 in _segments(perm, bk, block_rows, dynamic):
        wb = w[i1:i2].copy()
        err = np.empty_like(wb)
        ub = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = i1 + i
            if dynamic and (r == 0 or group[r] != group[r - 1]):  # a group starts: its qparams now
                size = int(np.sum(group[r:r + bk] == group[r]))
                gs = QuantSpec(spec.bits, (size, 1), spec.symmetric)
                gq = qparams(wb[i:i + size], gs, perm[r:r + size])
                g = group[r]
                group_scale[g], group_zero[g] = gq.scale[0], gq.zero_point[0]
                scale[r:r + size], zero[r:r + size] = gq.scale[0], gq.zero_point[0]
            row = wb[i]
            q = np.clip(np.round(row / scale[r]) + zero[r], 0.0, qmax)
            codes[r] = q
            e = (row - (q - zero[r]) * scale[r]) / ub[i, i]
            err[i] = e
            wb[i + 1:] -= np.outer(ub[i, i + 1:], e)
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ err
    if dynamic:
        qp = QParams(group_scale, group_zero, qp.block_shape, qp.qr)
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(k)
    return QuantizedWeight(codes[inverse].astype(code_dtype(qp.qr)), qp)


def refit_scales(w: np.ndarray, h: np.ndarray, codes: np.ndarray, qp: QParams) -> QParams:
    """Least-squares scales for fixed codes and zero points: per output column, the group scales
    ``s`` minimising the calibration output error ``(w - C s)^T H (w - C s)`` (``C`` holds each row's
    ``code - zero`` in its group's column). Exact, cheap (one ``H @ C`` per group), and never worse on
    the calibration data than the scales GPTQ rounded with. Group-wise or per-channel weights only."""
    k, n = w.shape
    bk, bn = qp.block_shape
    if bn != 1:
        return qp
    bk = min(bk, k)
    groups = [slice(g, min(g + bk, k)) for g in range(0, k, bk)]
    zero = expand_blocks(qp.zero_point, (k, n), qp.block_shape).astype(np.float32)
    c = codes.astype(np.float32) - zero  # [K, N]
    h32 = np.asarray(h, np.float32)
    hw = h32 @ np.asarray(w, np.float32)  # [K, N]
    g_count = len(groups)
    a = np.empty((n, g_count, g_count), np.float64)
    b = np.empty((n, g_count), np.float64)
    for j, gj in enumerate(groups):
        hc = h32[:, gj] @ c[gj]  # [K, N]: H times the group-j part of C
        for i, gi in enumerate(groups):
            a[:, i, j] = np.einsum("kn,kn->n", c[gi], hc[gi])
        b[:, j] = np.einsum("kn,kn->n", c[gj], hw[gj])
    ridge = 1e-6 * np.maximum(np.trace(a, axis1=1, axis2=2), 1e-30)[:, None, None] * np.eye(g_count)
    try:
        s = np.linalg.solve(a + ridge, b[..., None])[..., 0]  # [N, G]
    except np.linalg.LinAlgError:
        return qp
    old = qp.scale.T.astype(np.float64)
    s = np.where(np.isfinite(s) & (s * old > 0), s, old)  # same sign: symmetric scales may be negative
    return QParams(np.ascontiguousarray(s.T).astype(np.float32), qp.zero_point, qp.block_shape, qp.qr)


class GPTQ:
    needs_activations = True

    def __init__(self, stats: ActivationStats | None = None, *, damp: float = 0.01, act_order: bool = True,
                 clip: bool = False, refit: bool = True):
        self.stats = stats if stats is not None else ActivationStats()
        self.damp, self.act_order, self.clip, self.refit = damp, act_order, clip, refit

    def observe(self, x: np.ndarray) -> None:
        self.stats.update(x)

    def _damping(self) -> tuple[float, str]:
        st, damp = self.stats, self.damp
        if st.rows >= st.k:
            return damp, ""
        # A rank-deficient H: GPTQ fits the rows it saw and pushes the error into directions it never
        # saw (held-out output error 1.2-1.9x RTN's at 1/16-1 rows per input with damp 0.01; on CNN
        # classifiers, 16 rows for 1024-2048 inputs gave cosine 0.22-0.80 where RTN gives 0.997).
        # Dampening of 0.5 * inputs/rows measured 0.82-1.01x RTN's error over the same range.
        damp = max(damp, 0.5 * st.k / max(st.rows, 1))
        return damp, (f"GPTQ saw {int(st.rows)} calibration rows for {st.k} inputs: dampening raised to "
                      f"{damp:.2g} (give at least {st.k} rows)")

    def warm(self) -> None:
        """Compute what every weight reading these statistics shares (the factorisation, the float32 H),
        so that slices of a weight can then be solved on several threads at once."""
        st = self.stats
        if st.k == 0 or st.rows == 0 or not st.finite():
            return
        damp, note = self._damping()
        self._prepared(damp)
        if self._uses_h(note):
            st.normalized32()

    def _uses_h(self, note: str) -> bool:
        """Whether the solve reads H itself (the clipping search, the scale refit), besides its factor:
        only then is its float32 copy made (0.48 GB at K = 11008)."""
        return self.clip or (self.refit and not note)

    def _prepared(self, damp: float):
        st = self.stats
        key = ("gptq", damp, "act" if self.act_order else "none")
        if key not in st.cache:  # q, k and v share one factorisation
            divisors = st.normalizers()
            gram = st.release_gram()  # factorised in place: no K x K float64 copy besides it
            try:
                st.cache[key] = prepare(gram, damp=damp, order=key[2], divisors=divisors, overwrite=True,
                                        fallback=lambda: st.gram)
            except np.linalg.LinAlgError as exc:
                st.cache[key] = str(exc)
            del gram
        return st.cache[key]

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        """GPTQ on this weight; RTN (with a note saying why) when the Hessian is unusable."""
        st = self.stats
        if st.k == 0 or st.rows == 0:  # (st.gram would read a released matrix back)
            raise ValueError("no activations were observed")
        if not st.finite():
            return _rtn(w, spec, "GPTQ fell back to RTN: the calibration inputs hold NaN/Inf")
        damp, note = self._damping()
        prepared = self._prepared(damp)
        if isinstance(prepared, str):
            return _rtn(w, spec, f"GPTQ fell back to RTN: {prepared}")
        # GPTQ is invariant to the scale of H; the normalised float32 H (refit, clip's weights) cannot
        # overflow whatever the activations' magnitude.
        h = st.normalized32() if self._uses_h(note) else None
        q = gptq(w, h, spec, damp=damp, act_order=self.act_order, clip=self.clip, prepared=prepared)
        if not self.refit or note:  # least-squares scales on a rank-deficient H overfit (SQNR 22 -> 6 dB)
            return QuantizedWeight(q.codes, q.qparams, note)
        return QuantizedWeight(q.codes, refit_scales(w, h, q.codes, q.qparams), note)


def _rtn(w: np.ndarray, spec: QuantSpec, note: str) -> QuantizedWeight:
    from onnxfgq.algorithms.rtn import RTN

    q = RTN().solve(w, spec)
    return QuantizedWeight(q.codes, q.qparams, note)
