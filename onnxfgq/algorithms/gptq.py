"""GPTQ (Frantar et al., 2022): quantize the input rows of ``W [K, N]`` one at a time and push each
row's rounding error onto the rows not yet quantized, through the inverse Hessian ``H = X^T X / n``
of the layer's input, so that the layer's *output* error on the calibration data stays small.

- Dampening: ``H + damp * mean(diag H) * I`` keeps the Cholesky factorisation well conditioned;
  channels that never fire (``H_kk == 0``) are zeroed and left out of the update.
- Lazy blocks: errors are applied inside a block of ``block_rows`` rows eagerly and to the rest
  of the matrix once per block (one matrix product), which is where the time goes.
- Act-order with static groups: rows are processed by decreasing ``H_kk`` (most salient first), but
  the group qparams are computed up front on the original row order, so the result is a plain
  per-group weight (no ``g_idx``) that MatMulNBits and DequantizeLinear read as is.
- Any shape: groups are ``row // block`` and the last group may be short.
"""

from __future__ import annotations

import numpy as np

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.clip import search_qparams
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.quant import QParams, compute_qparams, expand_blocks


def _row_params(qp: QParams, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point expanded to every element of ``[K, N]`` (float32)."""
    return (expand_blocks(qp.scale, shape, qp.block_shape).astype(np.float32),
            expand_blocks(qp.zero_point, shape, qp.block_shape).astype(np.float32))


def _inverse_hessian_chol(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp*mean(diag)*I)^-1``, retrying with more damping.

    torch's LAPACK is several times faster than numpy's on these sizes; the math is the same.
    """
    import torch

    k = h.shape[0]
    ht = torch.from_numpy(np.ascontiguousarray(h, dtype=np.float64))
    mean_diag = float(torch.diagonal(ht).mean()) or 1.0
    for factor in (1, 10, 100, 1000):
        hd = ht + torch.eye(k, dtype=torch.float64) * (damp * factor * mean_diag)
        lower, info = torch.linalg.cholesky_ex(hd)
        if int(info) != 0:
            continue
        # (torch.cholesky_inverse is an order of magnitude slower than one triangular solve here)
        lower_inv = torch.linalg.solve_triangular(lower, torch.eye(k, dtype=torch.float64), upper=False)
        hinv = lower_inv.T @ lower_inv
        upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
        if int(info) == 0:
            return upper.numpy()
    raise np.linalg.LinAlgError("Hessian is not positive definite even with heavy dampening")


def prepare(h: np.ndarray, *, damp: float, act_order: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What GPTQ needs from a Hessian, shared by every weight that reads the same input:
    (dead input channels, row order, upper Cholesky factor of the damped inverse in that order)."""
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    u = _inverse_hessian_chol(h[np.ix_(perm, perm)], damp).astype(np.float32)
    return dead, perm, u


def gptq(w: np.ndarray, h: np.ndarray, spec: QuantSpec, *, damp: float = 0.01, act_order: bool = True,
         clip: bool = False, block_rows: int = 128,
         prepared: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> QuantizedWeight:
    """Quantize ``w [K, N]`` given the input Hessian ``h [K, K]`` (or its ``prepare``d form)."""
    w = np.array(w, dtype=np.float32)
    k, n = w.shape
    dead, perm, u = prepared if prepared is not None else prepare(h, damp=damp, act_order=act_order)
    w[dead, :] = 0.0
    # Static qparams from the (dead-zeroed) original weights: the groups do not move with the order.
    qp = (search_qparams(w, spec, np.diag(h)) if clip else
          compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False))
    scale, zero = _row_params(qp, (k, n))
    qmax = float(qp.qr.qmax)
    w, scale, zero = w[perm], scale[perm], zero[perm]
    codes = np.empty((k, n), np.float32)
    for i1 in range(0, k, block_rows):
        i2 = min(i1 + block_rows, k)
        wb = w[i1:i2].copy()
        err = np.empty_like(wb)
        ub = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = wb[i]
            q = np.clip(np.round(row / scale[i1 + i]) + zero[i1 + i], 0.0, qmax)
            codes[i1 + i] = q
            e = (row - (q - zero[i1 + i]) * scale[i1 + i]) / ub[i, i]
            err[i] = e
            wb[i + 1:] -= np.outer(ub[i, i + 1:], e)
        if i2 < k:
            w[i2:] -= u[i1:i2, i2:].T @ err
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(k)
    return QuantizedWeight(codes[inverse].astype(np.int32), qp)


class GPTQ:
    needs_activations = True

    def __init__(self, stats: ActivationStats | None = None, *, damp: float = 0.01, act_order: bool = True,
                 clip: bool = False):
        self.stats = stats if stats is not None else ActivationStats()
        self.damp, self.act_order, self.clip = damp, act_order, clip

    def observe(self, x: np.ndarray) -> None:
        self.stats.update(x)

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        h = self.stats.hessian()
        key = ("gptq", self.damp, self.act_order)
        if key not in self.stats.cache:  # q, k and v share one factorisation
            self.stats.cache[key] = prepare(h, damp=self.damp, act_order=self.act_order)
        return gptq(w, h, spec, damp=self.damp, act_order=self.act_order, clip=self.clip,
                    prepared=self.stats.cache[key])
