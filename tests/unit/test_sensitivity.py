"""End-to-end sensitivity probes (onnxfgq/sensitivity.py): KL divergence for causal LMs' logits
against a numpy reference, the attention mask honoured, and the ranking it exists for."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.graph.roles import logits_output
from onnxfgq.graph.targets import _classify
from onnxfgq.sensitivity import probe_errors

VOCAB, HIDDEN, T = 48, 16, 6
DEAD = np.arange(VOCAB // 2, VOCAB)  # tokens the model gives no probability


def tiny_lm(rng) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """input_ids -> Gather(embedding) -> MatMul(w1) -> Tanh -> MatMul(lm_head) -> logits. Hidden unit 0
    is always ~1 (a bias), and the lm_head puts the DEAD tokens' logits 20 below the rest through it."""
    weights = {"embed": rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32),
               "w1": rng.normal(size=(HIDDEN, HIDDEN)).astype(np.float32) / 4,
               "lm_head": rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32) * 2}
    weights["embed"][:, 0] = 10.0
    weights["w1"][0, :], weights["w1"][:, 0] = 0.0, 0.0
    weights["w1"][0, 0] = 1.0
    weights["lm_head"][0, DEAD] = -20.0
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "w1"], ["h1"], name="mm1"),
             helper.make_node("Tanh", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "lm_head"], ["logits"], name="head")]
    graph = helper.make_graph(
        nodes, "lm",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", VOCAB])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto), weights


def matmul(model: ir.Model, name: str):
    return _classify(next(n for n in model.graph if n.name == name))


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_logits(weights, ids, lm_head=None, w1=None):
    h = np.tanh(weights["embed"][ids] @ (weights["w1"] if w1 is None else w1))
    return (h @ (weights["lm_head"] if lm_head is None else lm_head)).astype(np.float64)


def test_logits_output_found_by_role():
    model, _ = tiny_lm(np.random.default_rng(0))
    assert logits_output(model.graph) == "logits"


def test_kl_probe_matches_numpy_and_skips_masked_positions():
    rng = np.random.default_rng(1)
    model, weights = tiny_lm(rng)
    head = matmul(model, "head")
    ids = rng.integers(0, VOCAB, size=(2, T))
    mask = np.ones((2, T), np.int64)
    mask[1, 3:] = 0  # padding: never scored
    noise = rng.normal(size=(HIDDEN, VOCAB)).astype(np.float32) * 0.3
    errors = probe_errors(model, [head], [head.weight()], [[lambda w: w + noise, lambda w: w]],
                          {"input_ids": ids, "attention_mask": mask}, logits="logits")
    ref = log_softmax(numpy_logits(weights, ids))
    out = log_softmax(numpy_logits(weights, ids, lm_head=weights["lm_head"] + noise))
    kl = (np.exp(ref) * (ref - out)).sum(-1)
    assert np.isclose(errors[0][0], kl[mask != 0].mean(), rtol=1e-4)
    assert not np.isclose(errors[0][0], kl.mean(), rtol=1e-3)  # the padded positions would change it
    assert errors[0][1] == 0.0


def test_kl_ranks_by_what_the_distribution_feels_and_mse_does_not():
    """Pushing down the logits of tokens that have no probability hardly moves the distribution, even
    by a lot; a small change to the likely tokens' logits moves it more. KL says so, squared logit
    error the opposite."""
    rng = np.random.default_rng(2)
    model, weights = tiny_lm(rng)
    head = matmul(model, "head")
    ids = rng.integers(0, VOCAB, size=(4, T))
    likely = np.argsort(np.exp(log_softmax(numpy_logits(weights, ids))).reshape(-1, VOCAB).mean(0))[-4:]

    def lower_dead(w):  # the dead tokens' logits 10 lower still
        w = w.copy()
        w[0, DEAD] -= 10.0
        return w

    wiggle = rng.normal(size=(HIDDEN, len(likely))).astype(np.float32) * 0.3

    def wiggle_likely(w):
        w = w.copy()
        w[:, likely] += wiggle
        return w

    cands = [[lower_dead, wiggle_likely]]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    kl = probe_errors(model, [head], [head.weight()], cands, feed, logits="logits")[0]
    mse = probe_errors(model, [head], [head.weight()], cands, feed)[0]
    assert kl[0] < kl[1]
    assert mse[0] > mse[1]
