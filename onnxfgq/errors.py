"""Errors a user can act on. The CLI prints ``str(err)`` on one line and exits non-zero."""

from onnxfgq.config import ConfigError


class OnnxfgqError(Exception):
    """Base class of errors caused by the input (not by a bug)."""


class ModelLoadError(OnnxfgqError):
    """The file is missing, not ONNX, truncated, or its external data is missing."""


class NothingToQuantizeError(OnnxfgqError):
    """No node of the model matches the selection."""


class OutputPathError(OnnxfgqError):
    """The output path would overwrite the input, or cannot be written."""


__all__ = ["ConfigError", "ModelLoadError", "NothingToQuantizeError", "OnnxfgqError", "OutputPathError"]
