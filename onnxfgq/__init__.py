"""onnxfgq: fine-grained post-training quantization of ONNX models."""

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


def __getattr__(name: str):
    # The API (onnx, onnxruntime, numpy) loads on first use, so that `onnxfgq ...` reaches the CLI's
    # signal handling in milliseconds: a Ctrl-C during start-up is then one line, not a traceback.
    if name in ("quantize", "QuantizeResult"):
        from onnxfgq import api

        return getattr(api, name)
    raise AttributeError(f"module 'onnxfgq' has no attribute {name!r}")
