"""BatchNorm folding: onnxruntime outputs before and after agree."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.graph import passes
from onnxfgq.graph.fold import fold_batchnorms


def _run(model: onnx.ModelProto | str, feed):
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _conv_bn(op="Conv", bias=True, shared=False):
    rng = np.random.default_rng(0)
    cin, cout = 3, 5
    wshape = (cout, cin, 3, 3) if op == "Conv" else (cin, cout, 3, 3)
    inits = [numpy_helper.from_array(rng.standard_normal(wshape).astype(np.float32), "w")]
    conv_inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b"))
        conv_inputs.append("b")
    for name, arr in (("gamma", rng.uniform(0.5, 2, cout)), ("beta", rng.standard_normal(cout)),
                      ("mean", rng.standard_normal(cout)), ("var", rng.uniform(0.1, 3, cout))):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
    nodes = [helper.make_node(op, conv_inputs, ["y"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"],
                              epsilon=1e-3, name="bn")]
    outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    if shared:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _fold(proto):
    model = ir.from_proto(proto)
    notes = fold_batchnorms(model)
    passes.remove_unused(model)
    return ir.to_proto(model), notes


def test_conv_and_conv_transpose_fold_exactly():
    x = np.random.default_rng(1).standard_normal((2, 3, 6, 6)).astype(np.float32)
    for op in ("Conv", "ConvTranspose"):
        for bias in (True, False):
            proto = _conv_bn(op, bias)
            folded, notes = _fold(proto)
            assert not notes
            assert [n.op_type for n in folded.graph.node] == [op]
            assert folded.graph.output[0].name == "z"
            np.testing.assert_allclose(_run(folded, {"x": x}), _run(proto, {"x": x}), rtol=1e-4, atol=1e-4)


def test_a_conv_output_used_elsewhere_is_not_folded():
    folded, notes = _fold(_conv_bn(shared=True))
    assert "BatchNormalization" in [n.op_type for n in folded.graph.node]
    assert notes and "other users" in notes[0]


def test_cnn_folds_every_batchnorm(cnn_dir):
    path = str(cnn_dir / "model.onnx")
    assert "BatchNormalization" in [n.op_type for n in onnx.load(path).graph.node]
    folded, notes = _fold(onnx.load(path))
    assert not notes and "BatchNormalization" not in [n.op_type for n in folded.graph.node]
    x = np.load(next(iter(sorted((cnn_dir / "heldout").glob("*.npz")))))["input"]
    np.testing.assert_allclose(_run(folded, {"input": x}), _run(path, {"input": x}), rtol=1e-4, atol=1e-4)
