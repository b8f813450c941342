"""Re-expressing per-block qparams in the layouts the emitted ops expect (pure numpy)."""

from __future__ import annotations

import numpy as np

from onnxfgq.quant.blocks import expand_blocks
from onnxfgq.quant.core import QParams


def resample_blocks(p: np.ndarray, qp: QParams, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """Per-block values ``p`` of a 2-D weight re-expressed as one value per ``block`` elements along
    ``axis``, with that axis moved last: ``[K, N]`` with axis 0 gives ``[N, ceil(K/block)]``.

    ``block`` must tile each original block (divide it, or span the whole axis), which holds for
    the block sizes the emitters pick.
    """
    other = 1 - axis
    if qp.block_shape[other] == 1 and qp.block_shape[axis] == min(block, shape[axis]):
        return np.ascontiguousarray(np.moveaxis(p, axis, -1))  # already per block: no expansion
    full = expand_blocks(p, shape, qp.block_shape)
    sampled = full[::block, :] if axis == 0 else full[:, ::block]
    return np.ascontiguousarray(np.moveaxis(sampled, axis, -1))


def signed_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes with a mid-range zero point -> signed codes with zero point 0."""
    return codes.astype(np.int32) - (1 << (bits - 1))
