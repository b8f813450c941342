"""Messages that say what is true (issue 10, "unclear messages"): inspect sees what quantize sees,
BatchNorm notes only for what is left, and --format custom without the library says what to do
from a pip install, before any work."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxfgq import ops
from onnxfgq.cli import main
from onnxfgq.static import prepare
from tests.helpers import messy, mlp


def test_inspect_simplifies_like_quantize(tmp_path, capsys):
    src = tmp_path / "messy.onnx"
    onnx.save(messy(), src)  # one weight is Reshape(initializer): only constant folding exposes it
    assert main(["inspect", str(src), "--simplify", "never"]) == 0
    assert "3 quantizable weights" in capsys.readouterr().out
    assert main(["inspect", str(src)]) == 0
    assert "4 quantizable weights" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "q.onnx"), "--no-eval"]) == 0
    assert "4 of 4 weight nodes quantized" in capsys.readouterr().out


def _bn_behind_constant_of_shape() -> onnx.ModelProto:
    """Conv weights made by ConstantOfShape (as the onnx wheel's zoo models have them): BatchNorm
    cannot fold before constant folding, and folds after it."""
    c = 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([c, 3, 3, 3], np.int64), "wshape")]
    for name, v in (("gamma", rng.uniform(0.5, 1.5, c)), ("beta", rng.standard_normal(c)),
                    ("mean", rng.standard_normal(c)), ("var", rng.uniform(0.5, 1.5, c))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [
        helper.make_node("ConstantOfShape", ["wshape"], ["w"], value=numpy_helper.from_array(np.array([0.1], np.float32))),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["y", "gamma", "beta", "mean", "var"], ["z"], name="bn"),
    ]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_batchnorm_notes_only_for_what_is_left():
    model, notes = prepare(ir.from_proto(_bn_behind_constant_of_shape()))
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    assert not any("BatchNormalization" in note for note in notes), notes


def test_custom_format_without_library_fails_first_with_a_pip_hint(tmp_path, capsys, monkeypatch):
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp(), src)
    monkeypatch.setenv(ops.ENV_VAR, str(tmp_path / "missing.so"))
    monkeypatch.setattr(ops, "__file__", str(tmp_path / "site-packages" / "onnxfgq" / "ops.py"))  # no sources
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--bits", "3", "--block-size", "48", "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install does not include" in err and "ONNXFGQ_OPS_LIBRARY" in err
    assert "--bits 2, 4 or 8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx"]
