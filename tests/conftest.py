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
