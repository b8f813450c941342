"""Typed, frozen configuration: what to quantize and how. Round-trips through JSON.

CLI defaults are taken from these dataclasses, so the CLI and the Python API cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ConfigError(ValueError):
    """An option value, or a combination of options, that cannot be honoured."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option = option


class Granularity(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


class OutputFormat(str, Enum):
    AUTO = "auto"  # MatMulNBits where it can express the request, else the custom op
    MATMULNBITS = "matmulnbits"
    QDQ = "qdq"
    CUSTOM = "custom"


class Simplify(str, Enum):
    AUTO = "auto"  # run onnxsim only when a weight is computed from constants (folding exposes it)
    ALWAYS = "always"
    NEVER = "never"


class Algorithm(str, Enum):
    RTN = "rtn"


MATMULNBITS_BITS = (2, 4, 8)
QDQ_BITS = (4, 8)
CUSTOM_BITS = (2, 3, 4, 5, 6, 7, 8)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class WeightConfig:
    """How each selected weight is quantized."""

    bits: int = 4
    granularity: Granularity = Granularity.GROUP
    block_size: int = 128
    symmetric: bool = False
    algorithm: Algorithm = Algorithm.RTN
    format: OutputFormat = OutputFormat.AUTO
    accuracy_level: int = 0

    def block_shape(self, shape: tuple[int, ...], reduced_axis: int, channel_axis: int) -> tuple[int, ...]:
        """Block shape over a weight of ``shape``: the torchao convention, one tuple for every granularity.

        Per-tensor spans everything; per-channel spans all but the channel axis; group-wise takes
        ``block_size`` along the reduced axis and 1 elsewhere.
        """
        if self.granularity is Granularity.TENSOR:
            return tuple(shape)
        if self.granularity is Granularity.CHANNEL:
            return tuple(1 if i == channel_axis else d for i, d in enumerate(shape))
        return tuple(min(self.block_size, d) if i == reduced_axis else 1 for i, d in enumerate(shape))

    def validate(self) -> None:
        if self.bits not in CUSTOM_BITS:
            raise ConfigError("--bits", f"{self.bits} is not supported; choose one of {CUSTOM_BITS}")
        if self.granularity is Granularity.GROUP and self.block_size < 1:
            raise ConfigError("--block-size", f"must be >= 1, got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError("--accuracy-level", f"must be 0..4, got {self.accuracy_level}")
        fmt = self.format
        if fmt is OutputFormat.MATMULNBITS:
            reason = self.matmulnbits_problem()
            if reason:
                raise ConfigError(*reason)
        elif fmt is OutputFormat.QDQ and self.bits not in QDQ_BITS:
            raise ConfigError(
                "--bits",
                f"--format qdq has int4/uint4/int8/uint8 only, not {self.bits} bits; "
                f"use --bits 4 or 8, or --format custom",
            )

    def matmulnbits_problem(self) -> tuple[str, str] | None:
        """Why MatMulNBits cannot express this config (option, message), or None."""
        if self.bits not in MATMULNBITS_BITS:
            return ("--bits", f"MatMulNBits supports bits {MATMULNBITS_BITS}, not {self.bits}; "
                    "use --format custom (or --format auto)")
        if self.granularity is Granularity.GROUP and (
            self.block_size < 16 or not is_power_of_two(self.block_size)
        ):
            lo = max(16, 1 << max(0, math.floor(math.log2(max(self.block_size, 1)))))
            return ("--block-size", f"MatMulNBits needs a power of two >= 16, not {self.block_size} "
                    f"(nearest: {lo} or {lo * 2}); use --format custom or --format qdq for other sizes")
        return None

    def resolved_format(self) -> OutputFormat:
        if self.format is not OutputFormat.AUTO:
            return self.format
        return OutputFormat.CUSTOM if self.matmulnbits_problem() else OutputFormat.MATMULNBITS


@dataclass(frozen=True)
class Selection:
    """Which nodes are quantized."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    include: tuple[str, ...] = ()  # regexes on node names; empty means all
    exclude: tuple[str, ...] = ()
    min_elements: int = 1024  # weights with fewer elements stay float
    quantize_embeddings: bool = False


@dataclass(frozen=True)
class QuantizeConfig:
    weights: WeightConfig = field(default_factory=WeightConfig)
    selection: Selection = field(default_factory=Selection)
    simplify: Simplify = Simplify.AUTO  # onnxsim before looking for weights

    def validate(self) -> None:
        self.weights.validate()
        if self.selection.min_elements < 0:
            raise ConfigError("--min-elements", "must be >= 0")

    def to_json(self) -> str:
        return json.dumps(_to_plain(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QuantizeConfig":
        return _from_plain(cls, json.loads(text))


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def _from_plain(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in hints:
            raise ConfigError(name, f"unknown field of {cls.__name__}")
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _from_plain(type(default), value)
        elif isinstance(default, Enum):
            kwargs[name] = type(default)(value)
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)
