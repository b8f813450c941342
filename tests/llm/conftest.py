"""The trained test LLM (cached under build/test-models/llama) and its exports (once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.llm.clients import N_WINDOWS, WINDOW

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def llama_hf() -> Path:
    from models.llama import trained_llama_hf

    return trained_llama_hf(ROOT / "build" / "test-models" / "llama", log=lambda *a, **k: None)


@pytest.fixture(scope="session")
def heldout_windows(llama_hf) -> np.ndarray:
    """[N_WINDOWS, WINDOW] token ids of held-out paragraphs (never seen in training or calibration)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama_hf / "tokenizer.json"))
    ids = np.asarray(tok.encode((llama_hf / "heldout.txt").read_text()).ids, np.int64)
    return ids[: N_WINDOWS * WINDOW].reshape(N_WINDOWS, WINDOW)


@pytest.fixture(scope="session")
def calib_text(llama_hf, tmp_path_factory) -> Path:
    """A calibration text file: 64 training paragraphs (the tokenizer sits in llama_hf)."""
    lines = (llama_hf / "train.txt").read_text().splitlines()[:64]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


class Exports:
    """Each export route built on first use, then reused for the session."""

    def __init__(self, hf: Path, root: Path):
        self.hf, self.root, self.built = hf, root, {}

    def __call__(self, route: str) -> Path:
        """The model file (builder, optimum: inside their client folder)."""
        if route not in self.built:
            from models import llm_exports as ex

            out = self.root / route
            if route in ("builder", "builder-fp16"):
                ex.export_builder(self.hf, out, "fp16" if route.endswith("fp16") else "fp32")
                path = out / "model.onnx"
            elif route == "optimum":
                ex.export_optimum(self.hf, out)
                path = out / "model.onnx"
            elif route in ("dynamo", "legacy"):
                path = ex.export_torch(self.hf, out / "model.onnx", dynamo=route == "dynamo")
            else:
                raise ValueError(route)
            self.built[route] = path
        return self.built[route]


@pytest.fixture(scope="session")
def exports(llama_hf, tmp_path_factory) -> Exports:
    return Exports(llama_hf, tmp_path_factory.mktemp("llm-exports"))


@pytest.fixture(scope="session")
def npz_feeds(llama_hf, calib_text, tmp_path_factory):
    """A folder of .npz prefill feeds (empty past) for a given export's inputs: the hand-made route
    users take when no text source fits."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(llama_hf / "tokenizer.json"))
    cfg = json.loads((llama_hf / "config.json").read_text())
    heads, size = cfg["num_key_value_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
    made: dict[tuple, Path] = {}

    def make(input_names: tuple[str, ...], n: int = 8, length: int = 64) -> Path:
        if input_names in made:
            return made[input_names]
        ids = np.asarray(tok.encode(calib_text.read_text()).ids, np.int64)
        folder = tmp_path_factory.mktemp("npz")
        for i in range(n):
            window = ids[i * length : (i + 1) * length][None]
            feed = {"input_ids": window, "attention_mask": np.ones_like(window)}
            if "position_ids" in input_names:
                feed["position_ids"] = np.arange(length, dtype=np.int64)[None]
            for name in input_names:
                if name.startswith("past_key_values"):
                    feed[name] = np.zeros((1, heads, 0, size), np.float32)
            np.savez(folder / f"{i:03d}.npz", **feed)
        made[input_names] = folder
        return folder

    return make
