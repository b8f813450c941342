"""AWQ: the scale search never loses to RTN on calibration output error, and the graph pass keeps
the float model's function (LayerNorm fold and inserted Mul), checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.algorithms.awq import search_scale
from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.config import Selection
from onnxfgq.graph.awq_fold import apply_input_scale, scale_float_weight
from onnxfgq.graph.targets import find_targets
from tests.helpers import run


def ln_block(extra: str, seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNorm -> q, k MatMuls (-> sum); the LN output may also feed a residual Add or a Shape."""
    rng = np.random.default_rng(seed)
    d, n = 48, 32
    inits = [numpy_helper.from_array(rng.uniform(0.5, 2, d).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.standard_normal(d).astype(np.float32) * 0.1, "beta"),
             numpy_helper.from_array(rng.standard_normal((d, n)).astype(np.float32), "wq"),
             numpy_helper.from_array(rng.standard_normal((d, n)).astype(np.float32), "wk")]
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["h", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["h", "wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["y"], name="sum")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])]
    if extra == "residual":
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["b", "s", d]))
    elif extra == "shape":  # shape readers (reshape dims in exported attention) do not block a fold
        nodes.append(helper.make_node("Shape", ["h"], ["hs"], name="shape"))
        outputs.append(helper.make_tensor_value_info("hs", TensorProto.INT64, [3]))
    graph = helper.make_graph(nodes, "ln_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", d])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("extra", ["", "residual", "shape"])
def test_fold_keeps_float_outputs(extra):
    residual = extra == "residual"
    proto = ln_block(extra)
    x = np.random.default_rng(1).standard_normal((2, 5, 48)).astype(np.float32) * 3
    before = run(proto, {"x": x})
    model = ir.from_proto(proto)
    targets = [t for t in find_targets(model.graph, Selection(min_elements=0)) if t.skip_reason is None]
    s = np.random.default_rng(2).uniform(0.25, 4.0, 48).astype(np.float32)
    note = apply_input_scale(model.graph, targets[0].node.inputs[0], [t.node for t in targets], s)
    for t in targets:
        scale_float_weight(model.graph, t, s)
    assert note == ("inserted Mul" if residual else "folded into ln")
    ops = [n.op_type for n in model.graph]
    assert ("Mul" in ops) == residual
    after = run(ir.to_proto(model), {"x": x})
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_search_never_worse_than_rtn_and_helps_salient_channels():
    rng = np.random.default_rng(0)
    k = 128
    x = rng.standard_normal((1024, k)).astype(np.float32)
    x[:, :6] *= 30.0  # salient channels
    st = ActivationStats()
    st.update(x)
    ws = [rng.standard_normal((k, 64)).astype(np.float32) for _ in range(3)]  # q, k, v share the input
    specs = [QuantSpec(4, (128, 1), False)] * 3
    found = search_scale(ws, specs, st)
    assert found.scale.shape == (k,) and np.all(found.scale > 0)
    assert found.error <= found.rtn_error
    assert found.alpha > 0 and found.error < 0.9 * found.rtn_error
    assert found.scale[:6].min() > np.median(found.scale)


def test_sampled_search_of_a_wide_problem_finds_an_alpha_as_good_as_the_exact_one(monkeypatch):
    """Above EXACT_FLOPS the search measures a sample of output columns; the alpha it picks, measured
    exactly, is within 5% of the exact search's best error."""
    import onnxfgq.algorithms.awq as awq

    rng = np.random.default_rng(2)
    k = 256
    x = rng.standard_normal((2048, k)).astype(np.float32)
    x[:, :8] *= 25.0
    st = ActivationStats()
    st.update(x)
    ws = [rng.standard_normal((k, 1024)).astype(np.float32) for _ in range(2)]
    specs = [QuantSpec(4, (64, 1), False)] * 2
    exact = search_scale(ws, specs, st)
    monkeypatch.setattr(awq, "EXACT_FLOPS", 0)
    monkeypatch.setattr(awq, "SAMPLED_COLUMNS", 64)
    sampled = search_scale(ws, specs, st)
    monkeypatch.setattr(awq, "EXACT_FLOPS", 1 << 60)
    at_sampled = search_scale(ws, specs, st, alphas=[sampled.alpha])
    assert sampled.alpha > 0 and at_sampled.error <= 1.05 * exact.error, (sampled.alpha, exact.alpha)
    assert abs(sampled.rtn_error - exact.rtn_error) <= 0.2 * exact.rtn_error  # the sample estimates it


def test_awq_end_to_end_on_mlp(tmp_path):
    from onnxfgq.api import quantize
    from onnxfgq.config import Algorithm, OutputFormat, QuantizeConfig, WeightConfig
    from tests.helpers import mlp

    proto = mlp()
    x = np.random.default_rng(3).standard_normal((16, 123)).astype(np.float32)
    ref = run(proto, {"x": x})[0]
    errs = {}
    for algo in (Algorithm.RTN, Algorithm.AWQ):
        cfg = QuantizeConfig(weights=WeightConfig(algorithm=algo, block_size=32, format=OutputFormat.QDQ,
                                                  calibration="random", calibration_samples=64))
        res = quantize(proto, cfg)
        out = run(ir.to_proto(res.model), {"x": x})[0]
        errs[algo] = float(np.mean((out - ref) ** 2))
    assert errs[Algorithm.AWQ] <= errs[Algorithm.RTN] * 1.1
