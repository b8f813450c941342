"""Re-expressing per-block qparams in the layouts the emitted ops expect (pure numpy)."""

from __future__ import annotations

import numpy as np

from onnxfgq.quant.blocks import expand_blocks, num_blocks
from onnxfgq.quant.core import QParams


def column_blocks(p: np.ndarray, qp: QParams, shape_kn: tuple[int, int], block_k: int) -> np.ndarray:
    """Per-block values ``p`` over ``[K, N]`` sampled at ``block_k`` steps along K -> ``[N, ceil(K/block_k)]``.

    ``block_k`` must tile each original block (a divisor of it, or at least K), which holds for
    the block sizes the emitters pick.
    """
    k, n = shape_kn
    bk, bn = qp.block_shape
    if bn == 1 and bk == min(block_k, k) and p.shape == num_blocks(shape_kn, (bk, 1)):
        return np.ascontiguousarray(p.T)  # already in the right blocks: avoid the expansion
    full = expand_blocks(p, shape_kn, qp.block_shape)
    return np.ascontiguousarray(full[::block_k, :].T)


def signed_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes with a mid-range zero point -> signed codes with zero point 0."""
    return codes.astype(np.int32) - (1 << (bits - 1))
