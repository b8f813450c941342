"""Cross-layer equalisation (Nagel et al. 2019, "Data-Free Quantization") and exact affine folds:
pure numpy on Conv weights laid out ``[out, in / group, *kernel]``. Graph matching: graph/equalize.py.

CLE rescales output channel ``i`` of a first conv by ``1 / s_i`` and input channel ``i`` of the next by
``s_i``, with ``s_i = sqrt(r1_i / r2_i)`` (``r`` = the channel's largest magnitude), so both end up with
range ``sqrt(r1_i * r2_i)``: per-channel int8 of the second conv's weight (whose scales are per *output*
channel) stops being dominated by a few wide input channels. Exact in float through an identity or a
positively homogeneous activation (``relu(x / s) = relu(x) / s`` for ``s > 0``), not through HardSwish,
Clip with an upper bound, or anything else.
"""

from __future__ import annotations

import numpy as np

SCALE_LIMITS = (1e-3, 1e3)  # never rescale a channel by more than this (a dead channel has range 0)


def in_channel_index(out_channels: int, in_per_group: int, group: int) -> np.ndarray:
    """``[out, in_per_group]``: the input channel each weight column of a grouped conv reads."""
    per_group_out = out_channels // group
    g = np.arange(out_channels) // per_group_out
    return g[:, None] * in_per_group + np.arange(in_per_group)[None, :]


def equalize_scales(w1: np.ndarray, w2: np.ndarray, group2: int) -> np.ndarray | None:
    """``s`` (one per channel between the two convs) or None when ``w2``'s grouping mixes channels in a
    way a per-channel scale cannot follow (only group 1 and depthwise are handled)."""
    c = w1.shape[0]
    r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
    if group2 == 1 and w2.shape[1] == c:
        r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(c, -1)).max(axis=1)
    elif group2 == c and w2.shape[0] == c and w2.shape[1] == 1:
        r2 = np.abs(w2.reshape(c, -1)).max(axis=1)
    else:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 / r2)
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, *SCALE_LIMITS)


def apply_scales(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, group2: int,
                 s: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The equalised ``(w1, b1, w2)``: output channel ``i`` of conv 1 divided by ``s_i``, input channel
    ``i`` of conv 2 multiplied by it (for a depthwise conv 2, its channel ``i``)."""
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    new_w1 = (w1 / s.reshape(shape1)).astype(w1.dtype)
    new_b1 = None if b1 is None else (b1 / s).astype(b1.dtype)
    if group2 == 1:
        new_w2 = w2 * s.reshape((1, -1) + (1,) * (w2.ndim - 2))
    else:
        new_w2 = w2 * s.reshape(shape1)
    return new_w1, new_b1, new_w2.astype(w2.dtype)


def fold_input_affine(w: np.ndarray, b: np.ndarray | None, group: int, scale: np.ndarray | None,
                      shift: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of ``conv(scale * x + shift)`` as a conv of ``x`` (``scale`` / ``shift``: one per
    input channel, broadcast from a scalar). The shift folds exactly only without padding: the caller
    checks. ``conv(a x + c) = conv_{w a}(x) + sum_{c,k} w[o, c, k] c_c``."""
    out, in_per_group = w.shape[0], w.shape[1]
    idx = in_channel_index(out, in_per_group, group)  # [out, in_per_group]
    ext = (1,) * (w.ndim - 2)
    w64 = w.astype(np.float64)
    bias = np.zeros(out) if b is None else b.astype(np.float64)
    cin = int(idx.max()) + 1

    def per_weight(v) -> np.ndarray:  # [out, in_per_group]: the value of each weight's input channel
        return np.broadcast_to(np.asarray(v, np.float64).reshape(-1), (cin,))[idx]

    if shift is not None:
        bias = bias + (w64.reshape(out, in_per_group, -1).sum(axis=2) * per_weight(shift)).sum(axis=1)
    if scale is not None:
        w64 = w64 * per_weight(scale).reshape(idx.shape + ext)
    return w64.astype(w.dtype), bias.astype(w.dtype)


def fold_output_affine(w: np.ndarray, b: np.ndarray | None, scale: np.ndarray | None,
                       shift: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Weight and bias of ``scale * conv(x) + shift`` (one per output channel, or scalars)."""
    out = w.shape[0]
    bias = np.zeros(out) if b is None else b.astype(np.float64)
    w64 = w.astype(np.float64)
    if scale is not None:
        a = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (out,))
        w64 = w64 * a.reshape((-1,) + (1,) * (w.ndim - 1))
        bias = bias * a
    if shift is not None:
        bias = bias + np.broadcast_to(np.asarray(shift, np.float64).reshape(-1), (out,))
    return w64.astype(w.dtype), bias.astype(w.dtype)


MAX_GAIN = 100.0  # a channel's activation is never amplified more than this


def activation_scales(channel_absmax: np.ndarray) -> np.ndarray:
    """``s`` for a Conv -> [Relu] -> depthwise Conv pair from the per-channel largest magnitude of the
    tensor between them: channel ``i`` is amplified by ``1 / s_i`` up to the widest channel's range
    (capped at ``MAX_GAIN``), so one per-tensor activation scale serves every channel. Per-channel int8
    of both weights is unaffected (each output channel of the first conv, and each channel of the
    depthwise one, keeps its own scale), which is why this choice ignores the weights."""
    r = np.asarray(channel_absmax, np.float64)
    top = r.max(initial=0.0)
    if top <= 0:
        return np.ones_like(r)
    s = np.where(r > 0, r / top, 1.0)
    return np.clip(s, 1.0 / MAX_GAIN, 1.0)
