"""Byte layouts of the tensors we emit.

- ONNX int4/uint4 tensors: two values per byte, element 2i in the low nibble (ONNX IR spec).
- MatMulNBits ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]``; each block holds codes of one
  output column, consecutive codes packed low bits first (ORT ContribOperators.md).
- MatMulNBits ``zero_points``: uint8 ``[N, ceil(n_blocks * bits / 8)]``, packed the same way per row.
"""

from __future__ import annotations

import math

import numpy as np

MATMULNBITS_BITS = (2, 4, 8)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` (values < 2**bits) low-bits-first into bytes, for bits in 2/4/8."""
    if bits not in MATMULNBITS_BITS:
        raise ValueError(f"byte-aligned packing supports bits {MATMULNBITS_BITS}, got {bits}")
    per_byte = 8 // bits
    codes = np.asarray(codes).astype(np.uint8) & np.uint8((1 << bits) - 1)
    n = codes.shape[-1]
    padded = math.ceil(n / per_byte) * per_byte
    if padded != n:
        codes = np.concatenate(
            [codes, np.zeros(codes.shape[:-1] + (padded - n,), np.uint8)], axis=-1
        )
    if bits == 8:
        return codes
    if bits == 4:  # the common case, without the generic reduction
        return codes[..., 0::2] | (codes[..., 1::2] << np.uint8(4))
    grouped = codes.reshape(codes.shape[:-1] + (padded // per_byte, per_byte))
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)


def _unpack_rows(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    vals = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return vals.reshape(packed.shape[:-1] + (-1,))[..., :n]


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack an int4/uint4 tensor (any shape, values in the 4-bit range) into ONNX's flat byte layout."""
    flat = np.asarray(codes).reshape(-1)
    return _pack_rows(flat, 4)


def unpack_int4(packed: np.ndarray, shape: tuple[int, ...], signed: bool) -> np.ndarray:
    size = int(np.prod(shape))
    vals = _unpack_rows(np.asarray(packed, np.uint8).reshape(-1), 4, size).astype(np.int32)
    if signed:
        vals = np.where(vals >= 8, vals - 16, vals)
    return vals.reshape(shape)


def pack_matmulnbits(codes_nk: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes laid out ``[N, K]`` -> MatMulNBits ``B`` of shape ``[N, n_blocks, block_size*bits/8]``.

    K is zero-padded to a whole number of blocks (the padded codes meet zero activations).
    """
    n, k = codes_nk.shape
    n_blocks = math.ceil(k / block_size)
    padded = np.zeros((n, n_blocks * block_size), np.uint8)
    padded[:, :k] = codes_nk
    blob = _pack_rows(padded.reshape(n, n_blocks, block_size), bits)
    return blob.reshape(n, n_blocks, block_size * bits // 8)


def pack_matmulnbits_kn(codes_kn: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``pack_matmulnbits(codes_kn.T, ...)`` from codes laid out ``[K, N]`` (as algorithms produce them).

    Codes are packed along K first (whole rows at a time: contiguous), and only the packed bytes are
    transposed, tile by tile: a byte-wise transpose reads one useful byte per cache line, which made
    ``ascontiguousarray(codes.T)`` the slowest step of RTN on a 7B shape (1.2 s per 11008 x 4096 weight;
    this route measured 0.2 s)."""
    if bits not in MATMULNBITS_BITS:
        raise ValueError(f"byte-aligned packing supports bits {MATMULNBITS_BITS}, got {bits}")
    k, n = codes_kn.shape
    n_blocks = math.ceil(k / block_size)
    per_byte = 8 // bits
    padded = np.zeros((n_blocks * block_size, n), np.uint8)
    padded[:k] = codes_kn
    mask = np.uint8((1 << bits) - 1)
    packed = padded[0::per_byte] & mask
    for i in range(1, per_byte):
        packed |= (padded[i::per_byte] & mask) << np.uint8(i * bits)
    return transpose_tiled(packed).reshape(n, n_blocks, block_size * bits // 8)


def transpose_tiled(a: np.ndarray, tile: int = 128) -> np.ndarray:
    """``ascontiguousarray(a.T)`` for a 2-D array, copied in cache-sized tiles."""
    rows, cols = a.shape
    out = np.empty((cols, rows), a.dtype)
    for i in range(0, rows, tile):
        for j in range(0, cols, tile):
            out[j:j + tile, i:i + tile] = a[i:i + tile, j:j + tile].T
    return out


def unpack_matmulnbits(blob: np.ndarray, bits: int, k: int) -> np.ndarray:
    n = blob.shape[0]
    return _unpack_rows(blob.reshape(n, -1), bits, k).astype(np.int32)


def pack_matmulnbits_zero_points(zp_nb: np.ndarray, bits: int) -> np.ndarray:
    """Integer zero points ``[N, n_blocks]`` -> uint8 ``[N, ceil(n_blocks*bits/8)]``."""
    return _pack_rows(zp_nb, bits)


def unpack_matmulnbits_zero_points(packed: np.ndarray, bits: int, n_blocks: int) -> np.ndarray:
    return _unpack_rows(np.asarray(packed, np.uint8), bits, n_blocks).astype(np.int32)
