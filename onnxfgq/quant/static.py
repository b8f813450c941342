"""Math for static (weights + activations) quantization: activation qparams from ranges, int32 bias,
and BatchNorm folding. Pure numpy, like the rest of ``onnxfgq.quant``."""

from __future__ import annotations

import numpy as np

from onnxfgq.quant.core import QParams, compute_qparams

INT32_MAX = np.iinfo(np.int32).max
WEIGHT_QMAX = 127  # int8 weights in [-127, 127]: no int16 saturation in u8s8 kernels


def activation_qparams(lo: float, hi: float, *, signed: bool, symmetric: bool, bits: int = 8) -> QParams:
    """Per-tensor qparams (8 or 16 bits) covering ``[lo, hi]`` (extended to contain 0)."""
    pair = np.array([min(float(lo), 0.0), max(float(hi), 0.0)], dtype=np.float32)
    return compute_qparams(pair, (2,), bits, symmetric=symmetric, signed=signed)


def per_channel_scale(w: np.ndarray, axis: int) -> np.ndarray:
    """Symmetric int8 scale per slice along ``axis`` (``absmax / 127``; 1 for an all-zero slice), shaped
    like ``w`` with every other axis reduced to 1."""
    w = np.abs(np.asarray(w, np.float32))
    absmax = np.max(w, axis=tuple(i for i in range(w.ndim) if i != axis), keepdims=True)
    return np.where(absmax > 0, absmax / WEIGHT_QMAX, 1.0).astype(np.float32)


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 codes and their scales (``input_scale * weight_scale``, one per output channel), the layout
    QLinearConv / QGemm take. Scales are raised where a code would overflow int32."""
    bias = np.asarray(bias, dtype=np.float64)
    scale = np.broadcast_to(np.float64(input_scale) * np.asarray(weight_scale, np.float64), bias.shape).copy()
    scale = np.maximum(scale, np.abs(bias) / INT32_MAX)
    scale = np.where(scale > 0, scale, 1.0)
    codes = np.clip(np.round(bias / scale), -INT32_MAX, INT32_MAX).astype(np.int32)
    return codes, scale.astype(np.float32)


def fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray,
                   mean: np.ndarray, var: np.ndarray, eps: float, channel_axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight and bias with ``BatchNorm(y) = gamma * (y - mean) / sqrt(var + eps) + beta`` folded in.

    ``channel_axis`` is the weight's output-channel axis (0 for Conv, 1 for ConvTranspose with group 1).
    """
    w = np.asarray(weight, dtype=np.float64)
    factor = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    shape = [1] * w.ndim
    shape[channel_axis] = -1
    b = np.zeros(w.shape[channel_axis]) if bias is None else np.asarray(bias, np.float64)
    new_b = (b - np.asarray(mean, np.float64)) * factor + np.asarray(beta, np.float64)
    return (w * factor.reshape(shape)).astype(weight.dtype), new_b.astype(weight.dtype)
