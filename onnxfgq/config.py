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


ENGINES = ("auto", "whole", "blocks")
AUTO_BLOCKS_BYTES = 2 << 30  # engine "auto": block by block above this much weight, whole model below
EXECUTORS = ("threads", "ray")  # where --engine blocks solves a block's weights (WeightConfig.executor)


class Granularity(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    ADAPTIVE = "adaptive"  # per matrix: the coarsest group size whose error stays under max_error


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
    """How each weight is solved; ``a+b`` runs both (AWQ scales first, then GPTQ and/or clipping)."""

    RTN = "rtn"
    CLIP = "clip"
    GPTQ = "gptq"
    GPTQ_CLIP = "gptq+clip"
    AWQ = "awq"
    AWQ_CLIP = "awq+clip"
    AWQ_GPTQ = "awq+gptq"
    AWQ_GPTQ_CLIP = "awq+gptq+clip"

    @property
    def parts(self) -> frozenset[str]:
        return frozenset(self.value.split("+"))

    @property
    def needs_calibration(self) -> bool:
        return bool(self.parts & {"gptq", "awq"})


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
    # Calibrated weight-only quantization (GPTQ, AWQ, output-error clipping / adaptive / mixed):
    calibration: str = ""  # data source spec ('text:FILE', a folder of .npz, 'random'); '' = none
    calibration_samples: int = 128
    calibration_batch_size: int = 16
    gptq_damp: float = 0.01  # fraction of mean(diag H) added to the Hessian's diagonal
    gptq_act_order: bool = True  # salient rows first, static groups (plain per-group output)
    gptq_sequential: bool = False  # re-collect later inputs from the partly quantized model (slower)
    gptaq: bool = False  # --engine blocks: aim GPTQ at the float model's output (asymmetric calibration)
    gptaq_alpha: float | None = None  # how far (0..1) towards that target; None = per layer, on held-out rows
    engine: str = "auto"  # calibration runs: "whole" model at once, "blocks" (onnxfgq/engine), or "auto"
    executor: str = "threads"  # --engine blocks: where a block's solves run ("threads" or "ray"; same output)
    max_error: float = 0.01  # adaptive: per-layer relative error budget (output error with calibration)
    target_bits: float = 0.0  # > 0: per-layer bit width (and block, if adaptive) under this average

    def block_shape(self, shape: tuple[int, ...], reduced_axis: int, channel_axis: int) -> tuple[int, ...]:
        """Block shape over a weight of ``shape``: the torchao convention, one tuple for every granularity.

        Per-tensor spans everything; per-channel spans all but the channel axis; group-wise takes
        ``block_size`` along the reduced axis and 1 elsewhere.
        """
        if self.granularity is Granularity.TENSOR:
            return tuple(shape)
        if self.granularity is Granularity.CHANNEL:
            return tuple(1 if i == channel_axis else d for i, d in enumerate(shape))
        # GROUP; ADAPTIVE starts from block_size and the planner replaces it per weight
        return tuple(min(self.block_size, d) if i == reduced_axis else 1 for i, d in enumerate(shape))

    def resolved_engine(self, weight_bytes: int) -> str:
        """``engine`` with "auto" decided: block by block for models over AUTO_BLOCKS_BYTES of weights
        (or with --gptaq, which needs it), else the whole model; both give the same statistics."""
        if self.engine != "auto":
            return self.engine
        return "blocks" if self.gptaq or weight_bytes > AUTO_BLOCKS_BYTES else "whole"

    def validate(self) -> None:
        if self.bits not in CUSTOM_BITS:
            raise ConfigError("--bits", f"{self.bits} is not supported; choose one of {CUSTOM_BITS}")
        if self.granularity is Granularity.GROUP and self.block_size < 1:
            raise ConfigError("--block-size", f"must be >= 1, got {self.block_size}")
        if not 0 <= self.accuracy_level <= 4:
            raise ConfigError("--accuracy-level", f"must be 0..4, got {self.accuracy_level}")
        if self.algorithm.needs_calibration and not self.calibration:
            raise ConfigError("--algo", f"{self.algorithm.value} needs calibration data: pass --calibration SRC")
        if self.calibration_samples < 1 or self.calibration_batch_size < 1:
            raise ConfigError("--calib-samples", "samples and batch size must be >= 1")
        if self.granularity is Granularity.ADAPTIVE and not self.max_error > 0 and not self.target_bits:
            raise ConfigError("--max-error", f"adaptive granularity needs a budget > 0, got {self.max_error}")
        if self.target_bits and not 1.0 < self.target_bits <= 16.0:
            raise ConfigError("--target-bits", f"must be in (1, 16], got {self.target_bits}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise ConfigError("--gptq-damp", f"must be in (0, 1), got {self.gptq_damp}")
        if self.gptaq_alpha is not None and not 0.0 <= self.gptaq_alpha <= 1.0:
            raise ConfigError("--gptaq-alpha", f"must be in [0, 1], got {self.gptaq_alpha}")
        if self.gptaq and ("gptq" not in self.algorithm.parts or self.engine == "whole"):
            raise ConfigError("--gptaq", "asymmetric calibration needs a GPTQ algorithm and --engine blocks "
                                         "(the float model's inputs are kept beside the quantized blocks' there)")
        if self.engine not in ENGINES:
            raise ConfigError("--engine", f"choose one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError("--executor", f"choose one of {', '.join(EXECUTORS)}, got {self.executor!r}")
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


class LMHead(str, Enum):
    """What happens to a language model's output projection (found by role, see graph/roles.py)."""

    AUTO = "auto"  # 8 where that is fast (MatMulNBits at accuracy_level 4), else like the rest
    SAME = "same"  # quantized like every other weight
    INT8 = "8"  # 8 bits, same block size (a tied embedding table follows it, stored once)
    FLOAT = "float"  # left in float (a tied embedding table too)


@dataclass(frozen=True)
class Selection:
    """Which nodes are quantized."""

    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    include: tuple[str, ...] = ()  # regexes on node names; empty means all
    exclude: tuple[str, ...] = ()
    min_elements: int = 1024  # weights with fewer elements stay float
    quantize_embeddings: bool = False
    # auto = like the rest (docs/BENCHMARKS.md, issue 9 stop 18): 8 bits lifts the test LLM's top-1 agreement
    # 0.891 -> 0.922 for +7% size, but decoded 0.86-0.96x the builder's int4 with accuracy_level 4 on a quiet
    # machine (4 bits: 0.92-1.18x), and at level 0 an 8-bit MatMulNBits runs a slow path (0.2x FP32 at 123M).
    lm_head: LMHead = LMHead.AUTO


class ObserverKind(str, Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class ActivationType(str, Enum):
    UINT8 = "uint8"
    INT8 = "int8"


STATIC_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class ActivationConfig:
    """Static quantization: int8/uint8 QDQ on activations plus per-channel int8 weights.

    ``calibration`` is a data source spec (see ``onnxfgq.calibration.sources``) or a ranges.json
    written by ``onnxfgq calibrate``. ``max_error`` is the accuracy guard's budget on the model's
    output against FP32, measured on calibration data: ``cosine:0.99`` (mean cosine at least 0.99),
    ``sqnr:30`` (at least 30 dB) or ``top1:0.99`` (the argmax of at least 99% of the output rows
    unchanged: classifiers, CTC recognisers); ``none`` turns the guard off.
    """

    dtype: ActivationType = ActivationType.UINT8
    symmetric: bool = False
    observer: ObserverKind = ObserverKind.MSE  # clipping BERT's outlier channels (percentile) hurts
    percentile: float = 99.99
    calibration: str = "random"
    num_samples: int = 128
    batch_size: int = 16
    max_error: str = "cosine:0.99"
    guard_samples: int = 64  # calibration samples the accuracy guard measures on
    op_types: tuple[str, ...] = STATIC_OP_TYPES
    neighbours: bool = True  # also Add/Mul/Concat/pooling between quantized nodes
    cle: bool = True  # cross-layer equalisation of Conv -> [Relu] -> Conv pairs (exact in float)
    bias_correction: bool = True  # fold the expected output shift of weight rounding into the bias
    # AdaRound: choose each int8 weight's rounding to minimise its layer's output error on calibration data
    adaround: bool = False
    # nodes the guard keeps out of 8 bits get 16-bit activations and int8 weights where the budget allows:
    # smaller, but off by default since onnxruntime runs them (and their neighbours) in float, slower than
    # the float model where many go 16-bit (PP-OCRv5 det: 0.65x, docs/BENCHMARKS.md)
    wide_activations: bool = False

    def error_budget(self) -> tuple[str, float] | None:
        """(metric, threshold) of ``max_error``, or None when the guard is off."""
        text = self.max_error.strip().lower()
        if text in ("", "none", "off"):
            return None
        metric, sep, value = text.partition(":")
        if not sep:
            metric, value = ("cosine" if _is_number(text) and float(text) <= 1 else "sqnr"), text
        if metric not in ("cosine", "sqnr", "top1") or not _is_number(value):
            raise ConfigError("--max-error", f"expected cosine:FLOAT, sqnr:DB, top1:FLOAT or none, "
                                             f"got {self.max_error!r}")
        return metric, float(value)

    def validate(self) -> None:
        self.error_budget()
        if self.num_samples < 1:
            raise ConfigError("--calib-samples", f"must be >= 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise ConfigError("--calib-batch-size", f"must be >= 1, got {self.batch_size}")
        if not 50 < self.percentile <= 100:
            raise ConfigError("--percentile", f"must be in (50, 100], got {self.percentile}")
        unknown = set(self.op_types) - set(STATIC_OP_TYPES)
        if unknown:
            raise ConfigError("--op-types", f"static mode quantizes {STATIC_OP_TYPES}, not {sorted(unknown)}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class FeedConfig:
    """How data sources build model inputs, for calibration and evaluation alike (see
    ``onnxfgq.calibration.feeds``): ``--tokenizer``, ``--dim NAME=INT``, and the model's folder
    (tokenizer, genai_config.json / config.json; ``quantize_file`` fills it in from the input path)."""

    tokenizer: str = ""  # '' = the model's folder, then the text file's
    dims: tuple[tuple[str, int], ...] = ()
    model_dir: str = ""

    def __post_init__(self) -> None:  # JSON gives lists, the CLI a dict: one canonical form
        items = self.dims.items() if isinstance(self.dims, dict) else self.dims
        object.__setattr__(self, "dims", tuple((str(k), int(v)) for k, v in items))


@dataclass(frozen=True)
class QuantizeConfig:
    weights: WeightConfig = field(default_factory=WeightConfig)
    selection: Selection = field(default_factory=Selection)
    simplify: Simplify = Simplify.AUTO  # onnxsim before looking for weights
    activations: ActivationConfig | None = None  # None: weight-only; set: static int8 (weights + activations)
    feeds: FeedConfig = field(default_factory=FeedConfig)  # --tokenizer, --dim: every data source
    # --rotate: R1/R2 rotations folded into the float weights first (graph/rotate/); the seed picks them
    rotate: bool = False
    rotate_seed: int = 0

    def validate(self) -> None:
        self.weights.validate()
        if self.rotate and self.activations is not None:
            raise ConfigError("--rotate", "rotations are for weight-only quantization, not --activations")
        if self.rotate_seed < 0:
            raise ConfigError("--rotate-seed", f"must be >= 0, got {self.rotate_seed}")
        if self.activations is not None:
            self.activations.validate()
        if self.selection.min_elements < 0:
            raise ConfigError("--min-elements", "must be >= 0")

    def to_json(self) -> str:
        return json.dumps(_to_plain(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> QuantizeConfig:
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
        if default is None and isinstance(value, dict) and name in _OPTIONAL_SECTIONS:
            kwargs[name] = _from_plain(_OPTIONAL_SECTIONS[name], value)
        elif dataclasses.is_dataclass(default):
            kwargs[name] = _from_plain(type(default), value)
        elif isinstance(default, Enum):
            kwargs[name] = type(default)(value)
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


_OPTIONAL_SECTIONS: dict[str, type] = {"activations": ActivationConfig}  # fields whose default is None
