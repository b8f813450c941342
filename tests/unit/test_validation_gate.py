"""The validation gate matches the runtime: the output is held to the checks the input passes.

onnxruntime-genai's builder writes SimplifiedLayerNormalization in the default domain: onnxruntime
runs it, onnx.checker rejects it. Such an input quantizes; an input that fails both is refused up
front (before any calibration work), with one line and nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import cli, cosine, run


def _rmsnorm_mlp(op: str = "SimplifiedLayerNormalization") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 96)) / 8).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(64)).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "scale"], ["n"], axis=-1, epsilon=1e-5, name="norm"),
             helper.make_node("MatMul", ["n", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 96])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture()
def rms_path(tmp_path) -> Path:
    path = tmp_path / "rms.onnx"
    onnx.save(_rmsnorm_mlp(), path)
    with pytest.raises(onnx.checker.ValidationError):  # the premise: the checker rejects the input
        onnx.checker.check_model(str(path))
    return path


@pytest.mark.parametrize("flags", [(), ("--algo", "gptq", "--calibration", "random", "--calib-samples", "128")],
                         ids=["rtn", "gptq"])
def test_input_failing_only_the_checker_quantizes(rms_path, tmp_path, flags):
    out = tmp_path / "q.onnx"
    report = tmp_path / "report.json"
    r = cli("quantize", str(rms_path), "-o", str(out), "--block-size", "32", "--report", str(report), *flags,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert any("validated by onnxruntime's load only" in n for n in json.loads(report.read_text())["notes"])
    x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    assert cosine(run(out, {"x": x})[0], run(rms_path, {"x": x})[0]) > 0.99


@pytest.mark.parametrize("flags", [(), ("--algo", "gptq", "--calibration", "random")], ids=["rtn", "gptq"])
def test_input_failing_checker_and_runtime_is_refused_up_front(tmp_path, flags):
    path = tmp_path / "bad.onnx"
    onnx.save(_rmsnorm_mlp("NoSuchNormalization"), path)
    r = cli("quantize", str(path), "-o", str(tmp_path / "q.onnx"), *flags, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "bad.onnx" in lines[0] and "fails onnx.checker" in lines[0] and "onnxruntime cannot load it" in lines[0]
    assert "NoSuchNormalization" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_gate_holds_the_output_to_what_the_input_passed(rms_path, tmp_path):
    """The API: a checker-passing input keeps the checker in the gate; a checker-failing one does not."""
    from onnxfgq.errors import ValidationError
    from onnxfgq.graph import io

    gate = io.input_gate(rms_path, io.load(rms_path))
    assert gate.runtime and not gate.checker
    io.check(rms_path, gate=gate)  # the input itself passes its own gate
    with pytest.raises(ValidationError, match="fails onnx.checker"):
        io.check(rms_path)  # the default gate (both) refuses it
    good = tmp_path / "good.onnx"
    onnx.save(_rmsnorm_mlp("LayerNormalization"), good)
    assert io.input_gate(good, io.load(good)) == io.Gate()


def test_failed_shape_inference_is_not_printed_on_success(tmp_path):
    """A stale value_info makes onnx's strict shape inference fail inside calibration; the run succeeds,
    so onnx_ir's "Shape inference failed" warning and its traceback must not reach the user."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 96)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 96])], [numpy_helper.from_array(w, "w")],
        value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 5])])
    path = tmp_path / "stale.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = cli("quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--algo", "gptq", "--calibration", "random",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Shape inference failed" not in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_folder_given_as_model_file_says_so(tmp_path):
    from onnxfgq.errors import ModelLoadError
    from onnxfgq.graph import io

    with pytest.raises(ModelLoadError, match="is a folder"):
        io.load(tmp_path)
