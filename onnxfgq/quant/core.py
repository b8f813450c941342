"""Quantization parameters, quantize and dequantize for any block granularity.

The affine map is ``real = (q - zero_point) * scale`` with integer codes ``q`` in ``[qmin, qmax]``.
Zero points are integers inside the code range, so the quantized range always contains 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxfgq.quant.blocks import block_reduce, blockwise

_TINY = np.float32(1e-12)


@dataclass(frozen=True)
class QRange:
    """The integer code range of a ``bits``-wide signed or unsigned type."""

    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1


def qrange(bits: int, signed: bool) -> QRange:
    if not 1 < bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    return QRange(bits, signed)


@dataclass(frozen=True)
class QParams:
    """Scales and integer zero points, one per block, plus the geometry that produced them."""

    scale: np.ndarray
    zero_point: np.ndarray
    block_shape: tuple[int, ...]
    qr: QRange


def compute_qparams(
    w: np.ndarray,
    block_shape: Sequence[int],
    bits: int,
    *,
    symmetric: bool,
    signed: bool,
    clip_ratio: float | np.ndarray = 1.0,
) -> QParams:
    """Min/max (optionally shrunk by ``clip_ratio``) qparams for each block of ``w``.

    Symmetric: the zero point sits at the middle of the range (0 for signed types, ``2**(bits-1)``
    for unsigned) and the block's value of largest magnitude, with its sign, maps to the lowest code
    (``scale = -extreme / 2**(bits-1)``, so the scale is negative where that value is positive): all
    ``2**bits`` codes are used, the extreme is exact, and only values of the other sign beyond 7/8 of
    it (4 bits) are clipped. This is onnxruntime's (MLAS) symmetric blockwise rule; a positive
    ``absmax / 7.5`` scale wastes half a step at each end (test LLM RTN g128 perplexity 71.37 vs
    71.19, FP32 71.10; see docs/BENCHMARKS.md). Asymmetric: the range spans [min, max] extended to
    contain 0, so that the integer zero point is exact.
    """
    qr = qrange(bits, signed)
    w = np.asarray(w, dtype=np.float32)
    block_shape = tuple(int(b) for b in block_shape)
    if symmetric:
        hi = block_reduce(w, block_shape, np.max)
        lo = block_reduce(w, block_shape, np.min)
        extreme = np.where(hi >= -lo, hi, lo) * clip_ratio
        mid = (qr.qmin + qr.qmax + 1) // 2
        scale = (-extreme / (mid - qr.qmin)).astype(np.float32)
        zero_point = np.full(scale.shape, mid, dtype=np.int32)
        scale = np.where(np.abs(scale) > _TINY, scale, np.float32(1.0)).astype(np.float32)
        return QParams(scale, zero_point, block_shape, qr)
    lo = np.minimum(block_reduce(w, block_shape, np.min) * clip_ratio, 0.0)
    hi = np.maximum(block_reduce(w, block_shape, np.max) * clip_ratio, 0.0)
    scale = ((hi - lo) / (qr.qmax - qr.qmin)).astype(np.float32)
    safe = np.where(scale > _TINY, scale, 1.0)
    zero_point = np.clip(np.round(qr.qmin - lo / safe), qr.qmin, qr.qmax).astype(np.int32)
    scale = np.where(scale > _TINY, scale, np.float32(1.0)).astype(np.float32)
    return QParams(scale, zero_point, block_shape, qr)


def code_dtype(qr: QRange) -> np.dtype:
    """The narrowest numpy integer type that holds the codes (uint8 for unsigned <= 8 bits)."""
    for dt in (np.uint8, np.int8, np.uint16, np.int16):
        info = np.iinfo(dt)
        if info.min <= qr.qmin and qr.qmax <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int32)


def quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    """Integer codes for ``w``, rounded to nearest (ties to even) and clipped to the range.

    Codes come in the narrowest integer type that holds them (:func:`code_dtype`): a weight's codes
    then take a quarter of its float memory, which matters on multi-GB models.
    """
    lo, hi = qp.qr.qmin, qp.qr.qmax
    out_type = code_dtype(qp.qr)

    def fn(x, scale, zp):
        q = np.divide(x, scale)
        np.round(q, out=q)
        q += zp
        np.clip(q, lo, hi, out=q)
        return q.astype(out_type)

    return blockwise(np.asarray(w, dtype=np.float32), qp.block_shape, fn, qp.scale, qp.zero_point)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    zero = np.asarray(qp.zero_point, np.float32)

    def fn(x, scale, zp):
        out = x.astype(np.float32)
        out -= zp
        out *= scale
        return out

    return blockwise(np.asarray(q), qp.block_shape, fn, qp.scale, zero)


def fake_quantize(w: np.ndarray, qp: QParams) -> np.ndarray:
    return dequantize(quantize(w, qp), qp)


def error_sums(reference: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    """``(sum reference^2, sum (reference - approx)^2)``; NaN for both when the data holds NaN/Inf.
    Sums of slices add up to the sums of the whole (``sqnr_from`` turns them into dB)."""
    ref = np.asarray(reference, dtype=np.float32).ravel()
    approx = np.asarray(approx, dtype=np.float32).ravel()
    noise = signal = 0.0
    # float32 BLAS dot products per chunk, summed in Python floats: accurate to ~1e-6 relative,
    # fast (float64 BLAS is throttled on some machines), and no full-size temporaries.
    step = 1 << 20
    for start in range(0, ref.size, step):
        r = ref[start:start + step]
        e = r - approx[start:start + step]
        noise += float(np.vdot(e, e))
        signal += float(np.vdot(r, r))
    if not (np.isfinite(noise) and np.isfinite(signal)):  # float32 squares overflow past ~1.8e19
        noise = signal = 0.0
        for start in range(0, ref.size, step):
            r = ref[start:start + step].astype(np.float64)
            e = r - approx[start:start + step]
            noise += float(np.vdot(e, e))
            signal += float(np.vdot(r, r))
        if not (np.isfinite(noise) and np.isfinite(signal)):
            return float("nan"), float("nan")  # NaN/Inf in the data: no ratio to report
    return signal, noise


def sqnr_from(signal: float, noise: float) -> float:
    if not (np.isfinite(noise) and np.isfinite(signal)):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * np.log10(signal / noise)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf for an exact match, NaN for NaN/Inf data)."""
    return sqnr_from(*error_sums(reference, approx))
