"""Causal-LM evaluation (onnxfgq/lm_eval.py) against transformers' own perplexity, and its NaN rules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxfgq import lm_eval

WINDOW = 48


@pytest.fixture(scope="module")
def windows(heldout_text, tiny_hf) -> np.ndarray:
    return lm_eval.text_windows(heldout_text, tiny_hf, WINDOW, limit=6)


def torch_perplexity(hf_dir: Path, windows: np.ndarray) -> float:
    """The reference: transformers' LlamaForCausalLM on the same windows, NLL in float64."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(windows)).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    nll = -lp.gather(-1, torch.from_numpy(windows[:, 1:, None])).mean()
    return float(torch.exp(nll))


@pytest.mark.parametrize("export", ["builder_fp32", "dynamo_export", "legacy_export"])
def test_perplexity_matches_transformers(export, request, tiny_hf, windows):
    """KV-cache exports (empty past, position_ids where declared) score the windows as torch does."""
    path = request.getfixturevalue(export)
    model = path / "model.onnx" if path.is_dir() else path
    ref = torch_perplexity(tiny_hf, windows)
    res = lm_eval.evaluate({"fp32": model}, windows, batch_size=4)
    assert res.perplexity["fp32"] == pytest.approx(ref, rel=1e-3)
    assert res.windows == len(windows) and res.length == WINDOW


def test_agreement_with_itself_is_one(builder_fp32, windows):
    model = builder_fp32 / "model.onnx"
    res = lm_eval.evaluate({"reference": model, "candidate": model}, windows, batch_size=3)
    assert res.top1_agreement == 1.0
    assert res.perplexity["reference"] == res.perplexity["candidate"]


def test_nan_weights_report_nan_never_agreement(legacy_export, windows, tmp_path):
    """A candidate whose lm_head is NaN: perplexity and agreement are NaN and the windows counted."""
    m = onnx.load(str(legacy_export))
    head = next(n for n in m.graph.node if n.op_type == "MatMul" and "lm_head" in n.name)
    init = next(i for i in m.graph.initializer if i.name == head.input[1])
    w = onnx.numpy_helper.to_array(init, base_dir=str(legacy_export.parent)).copy()
    w[0, 0] = np.nan
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad), save_as_external_data=True, location="bad.onnx.data")
    res = lm_eval.evaluate({"reference": legacy_export, "candidate": bad}, windows, batch_size=2)
    assert np.isnan(res.perplexity["candidate"]) and np.isnan(res.top1_agreement)
    assert res.non_finite["candidate"] == len(windows)
    assert np.isfinite(res.perplexity["reference"])
    assert res.metrics()["non_finite_windows_candidate"] == len(windows)


def test_model_without_kv_cache(opt_tiny_dir, tmp_path):
    """A decoder without past inputs (the OPT test model, byte tokens) runs as one prefill per window."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, size=(3, 32)).astype(np.int64)
    model = opt_tiny_dir / "model.onnx"
    res = lm_eval.evaluate({"a": model, "b": model}, ids, batch_size=2)
    assert np.isfinite(res.perplexity["a"]) and res.top1_agreement == 1.0


def test_cli_eval_perplexity(builder_fp32, heldout_text, tmp_path):
    cmd = [sys.executable, "-m", "onnxfgq.cli", "eval", str(builder_fp32), str(builder_fp32 / "model.onnx"),
           "--perplexity", f"text:{heldout_text}", "--lm-window", "32", "--lm-max-windows", "4"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())  # rich folds long lines
    assert "next_token_top1 1.0000" in out and "4 windows of 32 tokens" in out
    bad = subprocess.run(cmd[:6] + ["--perplexity", "text:missing.txt"], check=False, capture_output=True, text=True,
                          cwd=tmp_path)
    assert bad.returncode == 2 and "missing.txt" in bad.stderr and "Traceback" not in bad.stderr
