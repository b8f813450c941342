"""Graphs onnxfgq must answer clearly (issue 10, item 9): cycles, repeated node names, stored data that
does not match the dims, a huge weight without data, a node of an unknown domain."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxfgq import QuantizeConfig, api
from onnxfgq.cli import main
from onnxfgq.errors import ModelLoadError
from tests.helpers import cosine, mlp, run


def _variant(kind: str) -> onnx.ModelProto:
    m = mlp()
    if kind == "cycle":
        m.graph.node[0].input[0] = "r"  # fc1 reads relu's output, which reads fc1's
    elif kind == "short_raw":
        t = m.graph.initializer[0]
        t.raw_data = t.raw_data[:100]
    elif kind == "huge":
        m.graph.initializer[0].CopyFrom(onnx.TensorProto(name="w1", data_type=TensorProto.FLOAT, dims=[2**20, 2**20]))
        m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**20
    elif kind == "short_typed":
        w = m.graph.initializer[0]
        w.float_data.extend(np.frombuffer(w.raw_data, np.float32)[:10].tolist())
        w.ClearField("raw_data")
    return m


MESSAGES = {
    "cycle": "the graph has a cycle through node 'fc1'",
    "short_raw": "initializer 'w1' (FLOAT, 123x96) has 100 bytes of data where its dims need 47232",
    "short_typed": "initializer 'w1' (FLOAT, 123x96) has 10 values of data where its dims need 11808",
    "huge": "initializer 'w1' (FLOAT, 1048576x1048576) has no data",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_bad_graphs_are_refused_before_any_read(kind):
    """The API (in-memory models skip the file gate) refuses them before reading a weight: the huge
    one would otherwise be a 4 TiB allocation."""
    with pytest.raises(ModelLoadError) as err:
        api.quantize(_variant(kind), QuantizeConfig())
    assert str(err.value) == MESSAGES[kind] or str(err.value).startswith(MESSAGES[kind])


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_bad_graphs_get_one_line_and_exit_2(tmp_path, capsys, kind):
    src = tmp_path / f"{kind}.onnx"
    onnx.save(_variant(kind), src)
    out = tmp_path / "out.onnx"
    for argv in (["quantize", str(src), "-o", str(out), "--no-eval"], ["inspect", str(src)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("onnxfgq: error:") and "\n" not in err, err
        assert ("cycl" if kind == "cycle" else "w1") in err, err  # names the problem or the tensor
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing left behind


def test_repeated_node_names_give_unique_emitted_names(tmp_path):
    m = mlp()
    for node in m.graph.node:
        node.name = "same"
    src, out = tmp_path / "dup.onnx", tmp_path / "dup.q.onnx"
    onnx.save(m, src)
    api.quantize_file(src, out, QuantizeConfig())  # validated: onnxruntime refuses repeated names
    names = [n.name for n in onnx.load(out).graph.node]
    assert len(names) == len(set(names)) and any(n.startswith("same") for n in names)
    x = np.random.default_rng(0).standard_normal((2, 123)).astype(np.float32)
    assert cosine(run(mlp(), {"x": x})[0], run(onnx.load(out), {"x": x})[0]) > 0.98


def test_unknown_domain_node_is_kept_and_does_not_block_quantization():
    """A model with its own custom op: its MatMuls quantize; the custom node stays as it was."""
    m = mlp()
    m.graph.node[1].op_type, m.graph.node[1].domain = "MyRelu", "my.domain"
    m.opset_import.append(helper.make_opsetid("my.domain", 1))
    result = api.quantize(m, QuantizeConfig())
    assert len(result.report.quantized) == 2
    import onnx_ir as ir

    q = ir.to_proto(result.model)
    onnx.checker.check_model(q)
    custom = [n for n in q.graph.node if n.domain == "my.domain"]
    assert [n.op_type for n in custom] == ["MyRelu"]
    assert {o.domain: o.version for o in q.opset_import}["my.domain"] == 1


def test_ir3_initializers_listed_as_inputs():
    """IR-3 models list every initializer as a graph input (the Caffe2-era zoo): new initializers
    must not have to be inputs too, and the weights must stay weights (not model inputs)."""
    m = mlp()
    m.ir_version = 3
    m.opset_import[0].version = 8
    m.graph.node[2].op_type = "Gemm"
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    result = api.quantize(m, QuantizeConfig())
    assert any("IR version 3" in n for n in result.report.notes)
    import onnx_ir as ir

    q = ir.to_proto(result.model)
    onnx.checker.check_model(q)
    assert [i.name for i in q.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((2, 123)).astype(np.float32)
    assert cosine(run(m, {"x": x})[0], run(q, {"x": x})[0]) > 0.98


def test_unknown_domain_model_from_the_command_line(tmp_path, capsys):
    """onnxruntime cannot load the input either: quantizing still works (checked by onnx.checker),
    and the accuracy report, which needs onnxruntime, says so in one line."""
    m = mlp()
    m.graph.node[1].op_type, m.graph.node[1].domain = "MyRelu", "my.domain"
    m.opset_import.append(helper.make_opsetid("my.domain", 1))
    src, out = tmp_path / "custom.onnx", tmp_path / "custom.q.onnx"
    onnx.save(m, src)
    assert main(["quantize", str(src), "-o", str(out), "--no-eval"]) == 0
    assert [n.op_type for n in onnx.load(out).graph.node if n.domain == "my.domain"] == ["MyRelu"]
    capsys.readouterr()
    assert main(["quantize", str(src), "-o", str(tmp_path / "again.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "my.domain:MyRelu" in err
