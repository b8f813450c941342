"""Find and register the onnxfgq custom-op library (com.onnxfgq::MatMulBlockQuant).

    import onnxruntime as ort
    from onnxfgq import ops
    so = ort.SessionOptions()
    ops.register(so)
    session = ort.InferenceSession("model.onnx", so)
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxfgq.errors import OnnxfgqError

DOMAIN = "com.onnxfgq"
OP_TYPE = "MatMulBlockQuant"
OPSET_VERSION = 1
ENV_VAR = "ONNXFGQ_OPS_LIBRARY"
LIBRARY_NAME = "libonnxfgq_ops.so"

_CHECKOUT_HINT = ("build it with `python tools/build_custom_ops.py` from the repository root "
                  "(needs cmake and g++), or point ONNXFGQ_OPS_LIBRARY at a built libonnxfgq_ops.so")
# A pip install carries no C++ sources: say what works from there.
_PIP_HINT = ("--format custom (3/5/6/7 bits, block sizes such as 48) needs this library, which a pip install "
             "does not include: build it in a source checkout (`python tools/build_custom_ops.py`, needs cmake "
             "and g++) and set ONNXFGQ_OPS_LIBRARY to it, or use --bits 2, 4 or 8 with a power-of-two "
             "--block-size >= 16 (MatMulNBits, no library)")


def _hint() -> str:
    checkout = (Path(__file__).resolve().parent.parent / "custom_ops" / "CMakeLists.txt").is_file()
    return _CHECKOUT_HINT if checkout else _PIP_HINT


class OpsLibraryError(OnnxfgqError, RuntimeError):
    """The custom-op library is missing or onnxruntime could not load it (the CLI prints it whole)."""


def _candidates() -> list[Path]:
    package_dir = Path(__file__).resolve().parent
    return [
        package_dir.parent / "build" / "custom_ops" / LIBRARY_NAME,  # source checkout
        package_dir / "lib" / LIBRARY_NAME,  # copy installed with the package
    ]


def library_path() -> Path:
    """Path of the library: $ONNXFGQ_OPS_LIBRARY, else the repo's build dir, else the package's copy."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise OpsLibraryError(f"{ENV_VAR}={override} is not a file; {_hint()}")
        return path
    for path in _candidates():
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in _candidates())
    raise OpsLibraryError(f"custom-op library {LIBRARY_NAME} not found (looked in {searched}); {_hint()}")


def register(session_options) -> None:
    """Add the library's ops to an onnxruntime.SessionOptions."""
    import onnxruntime

    path = library_path()
    try:
        session_options.register_custom_ops_library(str(path))
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types
        raise OpsLibraryError(f"onnxruntime {onnxruntime.__version__} could not load {path}: {exc}") from exc


def output_shape(a_shape, n: int) -> list:
    """Shape of MatMulBlockQuant's output for an A of shape a_shape: ``a_shape[:-1] + [n]``.

    The op registers no C++ shape inference (ORT infers the output type only); emitters use this
    to write value_info. Dimensions may be ints or symbolic names.
    """
    a_shape = list(a_shape)
    if not a_shape:
        raise ValueError("A must have at least one dimension ([..., K])")
    return a_shape[:-1] + [int(n)]


def build(force: bool = False) -> Path:
    """Build the library from a source checkout (see tools/build_custom_ops.py); returns its path."""
    from onnxfgq import _build_ops

    try:
        return _build_ops.build(force=force)
    except _build_ops.BuildError as exc:
        raise OpsLibraryError(str(exc)) from exc
