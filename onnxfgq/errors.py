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


class ValidationError(OnnxfgqError):
    """The input cannot be validated (fails onnx.checker and does not load in onnxruntime), or the
    rewritten model fails the gate the input passed (a bug of ours; nothing is written then)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``exit_code`` is 128 + the signal number. A KeyboardInterrupt, so that
    no ``except Exception`` swallows it, while every ``finally`` (temporary folders) still runs."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was written")
        self.exit_code = 128 + signum


__all__ = ["ConfigError", "Interrupted", "ModelLoadError", "NothingToQuantizeError", "OnnxfgqError",
           "OutputPathError", "ValidationError"]
