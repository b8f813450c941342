"""A tiny random-weight Llama (models/llm_exports.py) and its exports, built once and cached under
build/test-models/lm-tiny (each export is rebuilt only when its folder is missing)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "test-models" / "lm-tiny"


@pytest.fixture(scope="session")
def tiny_hf() -> Path:
    from models.llm_exports import tiny_llama_hf

    return tiny_llama_hf(CACHE / "hf")


@pytest.fixture(scope="session")
def builder_fp32(tiny_hf) -> Path:
    """onnxruntime-genai's builder folder: genai_config.json, model.onnx + model.onnx.data, tokenizer."""
    from models.llm_exports import export_builder

    out = CACHE / "builder-fp32"
    if not (out / "genai_config.json").is_file():
        export_builder(tiny_hf, out, "fp32")
    return out


def _torch_export(tiny_hf: Path, *, dynamo: bool) -> Path:
    from models.llm_exports import export_torch

    out = CACHE / ("dynamo" if dynamo else "legacy") / "model.onnx"
    if not out.is_file():
        export_torch(tiny_hf, out, dynamo=dynamo)
    return out


@pytest.fixture(scope="session")
def dynamo_export(tiny_hf) -> Path:
    return _torch_export(tiny_hf, dynamo=True)


@pytest.fixture(scope="session")
def legacy_export(tiny_hf) -> Path:
    return _torch_export(tiny_hf, dynamo=False)


@pytest.fixture(scope="session")
def heldout_text(tmp_path_factory) -> Path:
    """Held-out docstring paragraphs (never in the tokenizer's training text)."""
    from models.llm_exports import training_texts

    _, held = training_texts()
    path = tmp_path_factory.mktemp("lmtext") / "heldout.txt"
    path.write_text("\n".join(held[:60]) + "\n")
    return path
