"""Shared fixtures: real models are built once per test session under a temporary folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # models/ is a top-level folder of scripts, not part of the package
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    """The real all-MiniLM-L6-v2 exported to ONNX, with tokenizer and calib/eval sentences."""
    from models.minilm import export

    out = tmp_path_factory.mktemp("minilm")
    export(out)
    return out


@pytest.fixture(scope="session")
def opt_tiny_dir() -> Path:
    """A tiny untrained OPT-architecture decoder (logits output), exported in seconds."""
    from models.opt import export

    out = ROOT / "build" / "test-models" / "opt-tiny"
    export(out, trained=False, log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def cnn_dir() -> Path:
    """The small BatchNorm CNN trained on sklearn's digits; weights cached under build/test-models."""
    from models.cnn import export

    out = ROOT / "build" / "test-models" / "cnn"
    export(out)
    return out


@pytest.fixture(scope="session")
def ops_library() -> Path:
    """The custom-op library, built once (CPU kernels; an existing build is reused as configured)."""
    from onnxfgq import _build_ops

    if _build_ops.library_in_build_dir().is_file():
        return _build_ops.build(cuda=None)
    return _build_ops.build(cuda="OFF")
