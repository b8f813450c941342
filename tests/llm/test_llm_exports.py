"""The test LLM is a real language model, and every export of it computes what transformers computes
(prefill and the KV-cache path), so quantization tests downstream measure quantization only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.llm.clients import PREFILL, KVSession


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_trained_llama_beats_a_unigram_model(exports, llama_hf, heldout_windows):
    """Held-out perplexity through the ONNX export (cache path included) is far below the unigram
    model's fitted on the training tokens."""
    metrics = json.loads((llama_hf / "metrics.json").read_text())
    sess = KVSession(exports("legacy"))
    nll = []
    for w in heldout_windows:
        logp = _log_softmax(sess.teacher_forced(w, PREFILL).astype(np.float64))
        nll += list(-logp[np.arange(len(w) - 1), w[1:]])
    ppl = float(np.exp(np.mean(nll)))
    assert ppl < 0.6 * metrics["unigram_perplexity"], (ppl, metrics)
    assert metrics["perplexity"] < 0.6 * metrics["unigram_perplexity"]


@pytest.mark.parametrize("route", ["builder", "legacy", "dynamo", pytest.param("optimum", marks=pytest.mark.slow)])
def test_fp32_export_matches_transformers(route, exports, llama_hf, heldout_windows):
    import torch
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(llama_hf, attn_implementation="eager").eval()
    sess = KVSession(exports(route))
    for w in heldout_windows[:2]:
        with torch.no_grad():
            ref = hf(torch.from_numpy(w[None])).logits[0].numpy()
        got = sess.teacher_forced(w, PREFILL)
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
        assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99
