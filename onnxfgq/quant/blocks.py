"""Block geometry shared by every granularity.

A granularity is a ``block_shape`` tuple of the tensor's rank (the torchao convention):
per-tensor is the full shape, per-channel puts 1 on the channel axis and the full size on the
others, group-wise puts ``g`` on the reduced axis. The last block along an axis may be short
(``K`` need not be a multiple of the block size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def num_blocks(shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, ...]:
    """Number of blocks along each axis (the shape of the scale tensor)."""
    if len(shape) != len(block_shape):
        raise ValueError(f"block_shape {tuple(block_shape)} does not match the rank of shape {tuple(shape)}")
    if any(b < 1 for b in block_shape):
        raise ValueError(f"block sizes must be >= 1, got {tuple(block_shape)}")
    return tuple(math.ceil(d / b) for d, b in zip(shape, block_shape))


def _clamp_block_shape(shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(b, d) if d > 0 else b for d, b in zip(shape, block_shape))


def block_reduce(
    x: np.ndarray, block_shape: Sequence[int], reducer: Callable[..., np.ndarray]
) -> np.ndarray:
    """Apply ``reducer(blocks, axis=...)`` over each block; returns an array of ``num_blocks`` shape.

    Short trailing blocks are padded by repeating their edge values, which leaves min, max and
    absolute max unchanged (the only reductions the qparams need).
    """
    block_shape = _clamp_block_shape(x.shape, block_shape)
    nb = num_blocks(x.shape, block_shape)
    pad = [(0, n * b - d) for n, b, d in zip(nb, block_shape, x.shape)]
    if any(p[1] for p in pad):
        x = np.pad(x, pad, mode="edge")
    split_shape: list[int] = []
    for n, b in zip(nb, block_shape):
        split_shape += [n, b]
    reduce_axes = tuple(range(1, 2 * x.ndim, 2))
    return reducer(x.reshape(split_shape), axis=reduce_axes)


def expand_blocks(p: np.ndarray, shape: Sequence[int], block_shape: Sequence[int]) -> np.ndarray:
    """Broadcast a per-block array back to the full tensor ``shape`` (cropping short blocks)."""
    block_shape = _clamp_block_shape(shape, block_shape)
    out = p
    for axis, (d, b) in enumerate(zip(shape, block_shape)):
        if b > 1:
            out = np.repeat(out, b, axis=axis)
        if out.shape[axis] != d:
            out = np.take(out, np.arange(d), axis=axis)
    return out


def blockwise(
    x: np.ndarray, block_shape: Sequence[int], fn: Callable[..., np.ndarray], *params: np.ndarray
) -> np.ndarray:
    """``fn(x_blocks, *params_blocks)`` elementwise with per-block ``params``, without expanding them.

    ``x`` is viewed as ``[n0, b0, n1, b1, ...]`` (padded at the end where a block is short) and each
    per-block array as ``[n0, 1, n1, 1, ...]``, so broadcasting does the expansion for free.
    """
    block_shape = _clamp_block_shape(x.shape, block_shape)
    nb = num_blocks(x.shape, block_shape)
    pad = [(0, n * b - d) for n, b, d in zip(nb, block_shape, x.shape)]
    padded = np.pad(x, pad) if any(p[1] for p in pad) else x
    split: list[int] = []
    pshape: list[int] = []
    for n, b in zip(nb, block_shape):
        split += [n, b]
        pshape += [n, 1]
    out = fn(padded.reshape(split), *(np.asarray(p).reshape(pshape) for p in params))
    out = out.reshape(padded.shape)
    if padded is not x:
        out = out[tuple(slice(0, d) for d in x.shape)]
    return out
