"""onnxfgq: fine-grained post-training quantization of ONNX models."""

from onnxfgq.api import QuantizeResult, quantize
from onnxfgq.config import (
    Algorithm,
    ConfigError,
    Granularity,
    OutputFormat,
    QuantizeConfig,
    Selection,
    WeightConfig,
)

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ConfigError",
    "Granularity",
    "OutputFormat",
    "QuantizeConfig",
    "QuantizeResult",
    "Selection",
    "WeightConfig",
    "quantize",
]
