"""The contract every weight algorithm follows (after IST-DASLab/gptq's add_batch / fasterquant).

Weights are MatMul-oriented ``[K, N]`` (``Y = X @ W``); blocks run along K. Codes are always
unsigned (``0 .. 2**bits - 1``) with integer zero points: emitters convert to signed types where a
format wants them. Algorithms may need activations (GPTQ, AWQ): those arrive through ``observe``
as arrays of shape ``[..., K]``, one calibration batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onnxfgq.quant import QParams, dequantize


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_shape: tuple[int, int]  # over [K, N]
    symmetric: bool


@dataclass(frozen=True)
class QuantizedWeight:
    codes: np.ndarray  # [K, N] unsigned codes, in the narrowest integer type that holds them (code_dtype)
    qparams: QParams  # per block of [K, N]
    note: str = ""  # what the algorithm had to do differently (e.g. GPTQ's fallback to RTN), for the report

    @property
    def bits(self) -> int:
        return self.qparams.qr.bits

    @property
    def symmetric(self) -> bool:
        mid = 1 << (self.bits - 1)
        return bool(np.all(self.qparams.zero_point == mid))

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.qparams)


class WeightQuantizer(Protocol):
    needs_activations: bool

    def observe(self, x: np.ndarray) -> None:
        """Accumulate statistics from one batch of this weight's input activations ``[..., K]``."""

    def solve(self, w: np.ndarray, spec: QuantSpec) -> QuantizedWeight:
        """Quantize ``w`` ``[K, N]``."""


def make_quantizer(algorithm: str) -> WeightQuantizer:
    from onnxfgq.algorithms.rtn import RTN

    registry = {"rtn": RTN}
    try:
        return registry[getattr(algorithm, "value", algorithm)]()
    except KeyError:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(registry)}") from None
