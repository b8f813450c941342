"""Adaptive granularity (after FineQuant): per matrix, the cheapest block layout whose error stays
under a budget. Big, well-behaved matrices get one scale per channel or per 256 weights;
outlier-heavy ones get groups of 32 or 16.

"Cheapest" is counted in stored bits (codes, scales and zero points, and the padding of K up to a
whole block that MatMulNBits needs), so a block size that does not tile K is not mistaken for a
saving. The error is the relative output error on the calibration data when activation statistics
are available (``trace(D^T H D) / trace(W^T H W)``), else the relative weight error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from onnxfgq.algorithms.base import QuantSpec

CHANNEL = 0  # block size meaning "one block spans K"
BLOCK_CANDIDATES = (CHANNEL, 256, 128, 64, 32, 16)
DIVISIONS = (2, 3, 4, 6, 8, 12, 16, 24)  # K / d blocks tried where blocks need not be powers of two


@dataclass(frozen=True)
class Choice:
    spec: QuantSpec
    error: float
    storage_bits: int

    @property
    def block(self) -> int:
        return self.spec.block_shape[0]


def storage_bits(k: int, n: int, spec: QuantSpec, *, scale_bits: int = 32, pad_to_power_of_two: bool = True) -> int:
    """Bits to store a ``[K, N]`` weight as ``spec`` says. With ``pad_to_power_of_two`` (MatMulNBits) K is
    padded to whole blocks and a per-channel block is the next power of two >= K."""
    bk = spec.block_shape[0]
    if bk >= k and pad_to_power_of_two:
        bk = matmulnbits_channel_block(k, spec.bits)
    blocks_k = math.ceil(k / bk)
    blocks_n = math.ceil(n / spec.block_shape[1])
    codes_k = blocks_k * bk if pad_to_power_of_two else k
    bits = codes_k * n * spec.bits + blocks_k * blocks_n * scale_bits
    if not spec.symmetric:
        if pad_to_power_of_two:  # MatMulNBits packs each column's zero points into whole bytes
            bits += blocks_n * 8 * math.ceil(blocks_k * spec.bits / 8)
        else:
            bits += blocks_k * blocks_n * spec.bits
    return bits


def matmulnbits_channel_block(k: int, bits: int) -> int:
    """The block the MatMulNBits emitter uses for a per-channel weight: the power of two >= 16 that
    stores codes and (repeated) scales in the fewest bytes."""
    top = max(16, 1 << math.ceil(math.log2(k)))

    def nbytes(b: int) -> float:
        return math.ceil(k / b) * (b * bits / 8 + 4)
    return min((1 << i for i in range(4, top.bit_length())), key=lambda b: (nbytes(b), -b))


def candidate_specs(k: int, bits: int, symmetric: bool, *, power_of_two: bool,
                    blocks: Sequence[int] = BLOCK_CANDIDATES) -> list[QuantSpec]:
    """Per-channel and group layouts over ``[K, N]`` (blocks >= K collapse into per-channel)."""
    out: list[QuantSpec] = []
    seen = set()
    if not power_of_two:  # formats without the power-of-two rule also get the even splits of K
        blocks = tuple(blocks) + tuple(k // d for d in DIVISIONS if k % d == 0 and k // d >= 16)
        blocks = tuple(sorted(set(blocks), key=lambda b: -(k if b == CHANNEL else b)))
    for b in blocks:
        bk = k if b == CHANNEL or b >= k else b
        if power_of_two and bk != k and (bk < 16 or bk & (bk - 1)):
            continue
        if bk not in seen:
            seen.add(bk)
            out.append(QuantSpec(bits, (bk, 1), symmetric))
    return out


def evaluate(w: np.ndarray, specs: Sequence[QuantSpec], error: Callable[[np.ndarray, QuantSpec], float], *,
             scale_bits: int = 32, power_of_two: bool = True) -> list[Choice]:
    k, n = w.shape
    return [Choice(s, error(w, s), storage_bits(k, n, s, scale_bits=scale_bits, pad_to_power_of_two=power_of_two))
            for s in specs]


def choose_under_budget(choices: Sequence[Choice], max_error: float) -> Choice:
    """The cheapest choice with ``error <= max_error`` (ties: lower error); the most accurate if none fits."""
    fitting = [c for c in choices if c.error <= max_error]
    if not fitting:
        return min(choices, key=lambda c: (c.error, c.storage_bits))
    return min(fitting, key=lambda c: (c.storage_bits, c.error))
