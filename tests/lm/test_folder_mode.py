"""Folder mode: an export folder in, a folder its client runs as it is out (onnxfgq/folders.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxfgq import folders
from tests.helpers import cli as run_cli


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("quantize", *args, cwd=cwd)


def genai_greedy(folder: Path, prompt: list[int], new: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]


def ort_greedy(model: Path, prompt: list[int], new: int, kv_heads: int, head: int, layers: int) -> list[int]:
    """The independent reference: plain onnxruntime, the whole sequence each step with an empty past."""
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ids = list(prompt)
    for _ in range(new):
        x = np.array([ids], np.int64)
        feed = {"input_ids": x, "attention_mask": np.ones_like(x)}
        for i in range(layers):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, kv_heads, 0, head), np.float32)
        logits = sess.run(["logits"], feed)[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids


def test_builder_folder_runs_in_genai(builder_fp32, heldout_text, tmp_path):
    out = tmp_path / "genai_int4"
    # the report evaluates the staged folder as a causal LM (the past's head size comes from its config)
    proc = cli(builder_fp32, "-o", out, "--block-size", "32", "--perplexity", f"text:{heldout_text}",
               "--lm-window", "32", "--lm-max-windows", "4", "--report", tmp_path / "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"]["metrics"]["next_token_top1"] > 0.5
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in builder_fp32.iterdir())
    assert (out / "genai_config.json").read_bytes() == (builder_fp32 / "genai_config.json").read_bytes()
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in m.graph.node) >= 5
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("onnxruntime-genai" in n for n in notes)
    cfg = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    prompt = [1, 40, 41, 42, 43]
    tokens = genai_greedy(out, prompt, 10)
    assert len(tokens) == len(prompt) + 10
    assert tokens == ort_greedy(out / "model.onnx", prompt, 10, cfg["num_key_value_heads"], cfg["head_size"],
                                cfg["num_hidden_layers"])
    assert not list(tmp_path.glob(".onnxfgq-*"))


@pytest.fixture()
def optimum_like(legacy_export, tiny_hf, tmp_path) -> Path:
    """An optimum-style folder: config.json, tokenizer files, model.onnx + model.onnx_data."""
    folder = tmp_path / "optimum_fp32"
    folder.mkdir()
    m = onnx.load(str(legacy_export))
    onnx.save(m, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx_data")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_hf / name, folder / name)
    return folder


def test_optimum_folder_loads_in_onnxruntime(optimum_like, tmp_path):
    before = {p.name: p.read_bytes() for p in optimum_like.iterdir()}
    other = tmp_path / "elsewhere"
    other.mkdir()
    proc = cli(optimum_like, "-o", tmp_path / "optimum_int4", "--lm-head", "8", "--no-eval", cwd=other)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "optimum_int4"
    names = {p.name for p in out.iterdir()}
    assert names == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "model.onnx", "model.onnx.data"}  # external data renamed, the model refers to the new name
    assert {p.name: p.read_bytes() for p in optimum_like.iterdir()} == before  # input untouched
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 50, 60, 70]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(4)[None]}
    for i in (0, 1):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, 2, 0, 16), np.float32)
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape == (1, 4, 512) and np.isfinite(logits).all()
    assert "folder for optimum" in " ".join(proc.stdout.split())


def test_refusals_leave_nothing(optimum_like, tmp_path):
    inside = optimum_like / "sub"
    for target in (optimum_like, inside):
        proc = cli(optimum_like, "-o", target, "--no-eval", cwd=tmp_path)
        assert proc.returncode == 2 and "inside it" in proc.stderr and "Traceback" not in proc.stderr
    assert not inside.exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    proc = cli(optimum_like, "-o", busy, "--no-eval", cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    # a failure after the checks (nothing matches the selection): no output, no temporary folder
    proc = cli(optimum_like, "-o", tmp_path / "never", "--include", "no-such-node", "--no-eval", cwd=tmp_path)
    assert proc.returncode == 2 and "nothing to quantize" in proc.stderr
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".onnxfgq-*"))
    # a failure in the report after the work (text shorter than one window): still nothing written
    short = tmp_path / "short.txt"
    short.write_text("too short\n")
    proc = cli(optimum_like, "-o", tmp_path / "never", "--perplexity", f"text:{short}", cwd=tmp_path)
    assert proc.returncode == 2 and "fewer than one window" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".onnxfgq-*"))


def test_open_folder_rules(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "../x.onnx"}}}))
    with pytest.raises(folders.ModelLoadError, match="not a file"):
        folders.open_folder(tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    for n in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        (two / n).write_bytes(b"")
    with pytest.raises(folders.ModelLoadError, match="several models"):
        folders.open_folder(two)
