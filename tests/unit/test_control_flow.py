"""Weights inside If/Loop bodies and model-local functions are found and quantized like any other."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq import QuantizeConfig, WeightConfig, api
from onnxfgq.config import Algorithm, OutputFormat, Selection
from tests.helpers import cosine, run

K = 96


def _w(rng, k=K, n=K):
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def control_flow_model(seed: int = 0) -> onnx.ModelProto:
    """x -> If(cond){then: MatMul(x, W_then const node) | else: MatMul(x, W_else outer initializer)}
    -> Loop(3 times){h = Tanh(MatMul(h, W_loop))} -> local function f(h) = MatMul(h, W_fn) -> y."""
    rng = np.random.default_rng(seed)
    w_then, w_else, w_loop, w_fn = (_w(rng) for _ in range(4))
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", K])
    then_g = helper.make_graph(
        [helper.make_node("Constant", [], ["wt"], value=numpy_helper.from_array(w_then, "wt"), name="then_w"),
         helper.make_node("MatMul", ["x", "wt"], ["then_out"], name="then_mm")],
        "then", [], [vi("then_out")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "w_else"], ["else_out"], name="else_mm")],
                               "else", [], [vi("else_out")])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="loop_cond"),
         helper.make_node("MatMul", ["h_in", "w_loop"], ["hm"], name="loop_mm"),
         helper.make_node("Tanh", ["hm"], ["h_out"], name="loop_tanh")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("h_in")],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("h_out")])
    fn = helper.make_function(
        "local", "proj", ["a"], ["b"],
        [helper.make_node("Constant", [], ["wf"], value=numpy_helper.from_array(w_fn, "wf"), name="fn_w"),
         helper.make_node("MatMul", ["a", "wf"], ["b"], name="fn_mm")],
        opset_imports=[helper.make_opsetid("", 17)])
    nodes = [
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
        helper.make_node("Loop", ["trips", "true", "branch"], ["looped"], body=body, name="loop"),
        helper.make_node("proj", ["looped"], ["y"], domain="local", name="call_proj"),
    ]
    graph = helper.make_graph(
        nodes, "cf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K]),
                      helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [vi("y")],
        [numpy_helper.from_array(w_else, "w_else"), numpy_helper.from_array(w_loop, "w_loop"),
         numpy_helper.from_array(np.array(3, np.int64), "trips"), numpy_helper.from_array(np.array(True), "true")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                             functions=[fn])


def _feeds(batch=4):
    x = np.random.default_rng(5).standard_normal((batch, K)).astype(np.float32)
    return [{"x": x, "cond": np.array(c)} for c in (True, False)]


@pytest.mark.parametrize("fmt", [OutputFormat.MATMULNBITS, OutputFormat.QDQ])
def test_weights_in_bodies_and_functions_are_quantized(tmp_path, fmt):
    model = control_flow_model()
    src = tmp_path / "cf.onnx"
    onnx.save(model, src)
    out = tmp_path / "cf.q.onnx"
    config = QuantizeConfig(weights=WeightConfig(bits=8, block_size=32, format=fmt),
                            selection=Selection(min_elements=0))
    report = api.quantize_file(src, out, config)
    names = sorted(layer.name for layer in report.quantized)
    assert names == ["else_mm", "fn_mm", "loop_mm", "then_mm"], names
    q = onnx.load(out)
    assert all(init.name not in ("w_else", "w_loop") for init in q.graph.initializer)  # float copies gone
    for feed in _feeds():
        ref, got = run(model, feed)[0], run(q, feed)[0]
        assert cosine(ref, got) > 0.999  # 8 bits through five quantized MatMuls
        assert not np.allclose(ref, got, atol=1e-6)  # really quantized


def test_gptq_falls_back_to_rtn_inside_bodies(tmp_path):
    model = control_flow_model()
    src = tmp_path / "cf.onnx"
    onnx.save(model, src)
    out = tmp_path / "cf.q.onnx"
    config = QuantizeConfig(weights=WeightConfig(block_size=32, algorithm=Algorithm.GPTQ, calibration="random",
                                                 calibration_samples=8),
                            selection=Selection(min_elements=0))
    report = api.quantize_file(src, out, config)
    assert len(report.quantized) == 4
    nested = {layer.name: layer for layer in report.quantized}
    assert nested["loop_mm"].algorithm == "rtn"
    for feed in _feeds():
        assert cosine(run(model, feed)[0], run(onnx.load(out), feed)[0]) > 0.95  # int4, five MatMuls deep


def test_inspect_lists_nested_weights(tmp_path, capsys):
    from onnxfgq.cli import main

    src = tmp_path / "cf.onnx"
    onnx.save(control_flow_model(), src)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "4 quantizable weights" in text
