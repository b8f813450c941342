"""Little-endian bit-stream packing of low-bit integer codes (any width 1..8).

Layout (the contract of com.onnxfgq::MatMulBlockQuant's ``B`` input): row ``n`` holds the
``K`` codes of that row back to back; code ``k`` occupies bits ``[k*bits, (k+1)*bits)`` where
bit ``j`` of the row is bit ``j % 8`` of byte ``j // 8``. Each row is zero-padded to a whole
byte, so a packed row has ``ceil(K * bits / 8)`` bytes.

Eight codes of ``bits`` bits fill exactly ``bits`` bytes, so both directions work on groups of
eight codes held in one little-endian uint64: no per-bit intermediate arrays, memory stays at
about eight bytes per code.
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_bitstream", "packed_row_bytes", "unpack_bitstream"]

_SHIFTS_CACHE: dict[int, np.ndarray] = {}


def _shifts(bits: int) -> np.ndarray:
    if bits not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[bits] = (np.arange(8, dtype=np.uint64) * np.uint64(bits)).astype(np.uint64)
    return _SHIFTS_CACHE[bits]


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes in one packed row of ``k`` codes of ``bits`` bits."""
    return (int(k) * _check_bits(bits) + 7) // 8


def pack_bitstream(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[N, K]`` (each in ``[0, 2**bits)``) into uint8 ``[N, ceil(K*bits/8)]``."""
    bits = _check_bits(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be an integer array, got {codes.dtype}")
    n, k = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}, "
                         f"got range [{codes.min()}, {codes.max()}]")
    k8 = (k + 7) // 8
    padded = np.zeros((n, k8 * 8), dtype=np.uint64)
    padded[:, :k] = codes
    words = np.bitwise_or.reduce(padded.reshape(n, k8, 8) << _shifts(bits), axis=2)
    as_bytes = words.astype("<u8").view(np.uint8).reshape(n, k8, 8)[:, :, :bits]
    return np.ascontiguousarray(as_bytes.reshape(n, k8 * bits)[:, :packed_row_bytes(k, bits)])


def unpack_bitstream(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bitstream`: uint8 ``[N, ceil(k*bits/8)]`` -> uint8 codes ``[N, k]``."""
    bits = _check_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    row_bytes = packed_row_bytes(k, bits)
    if packed.shape[1] != row_bytes:
        raise ValueError(f"packed rows must have {row_bytes} bytes for k={k}, bits={bits}, "
                         f"got {packed.shape[1]}")
    n = packed.shape[0]
    k8 = (int(k) + 7) // 8
    raw = np.zeros((n, k8 * bits), dtype=np.uint8)
    raw[:, :row_bytes] = packed
    words8 = np.zeros((n, k8, 8), dtype=np.uint8)
    words8[:, :, :bits] = raw.reshape(n, k8, bits)
    words = words8.view("<u8")  # [n, k8, 1]
    mask = np.uint64((1 << bits) - 1)
    codes = (words >> _shifts(bits)) & mask  # [n, k8, 8]
    return codes.reshape(n, k8 * 8)[:, :k].astype(np.uint8)
