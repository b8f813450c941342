"""lm_head and token embedding found by role on every exporter's naming, and --lm-head's effect."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.api import quantize
from onnxfgq.config import LMHead, QuantizeConfig, Selection, WeightConfig
from onnxfgq.graph.roles import find_roles
from tests.helpers import cosine, mlp, run


@pytest.mark.parametrize("export, head_name", [("builder_fp32", "/lm_head/MatMul"),
                                               ("dynamo_export", "node_linear_"),
                                               ("legacy_export", "/lm/lm_head/MatMul")])
def test_roles_on_each_exporter(export, head_name, request):
    path = request.getfixturevalue(export)
    model = ir.load(path / "model.onnx" if path.is_dir() else path)
    roles = find_roles(model.graph)
    assert roles.lm_head is not None and roles.lm_head.name.startswith(head_name)
    assert roles.lm_head.outputs[0].name == "logits" or any(
        u.op_type in ("Reshape", "Cast", "Identity") for u, _ in roles.lm_head.outputs[0].uses())
    assert roles.embedding is not None and roles.embedding.op_type == "Gather"
    assert roles.embedding.inputs[1].name == "input_ids"
    assert not roles.tied


def test_no_lm_head_in_an_mlp():
    roles = find_roles(ir.from_proto(mlp()).graph)
    assert roles.lm_head is None and roles.embedding is None


def _tied_lm(vocab: int = 96, hidden: int = 64, seed: int = 0, copy: bool = False) -> onnx.ModelProto:
    """ids -> Gather(table) -> MatMul(W) -> MatMul(Transpose(table)) -> Reshape -> logits (tied); with
    ``copy`` the lm_head reads a transposed copy of the table (what exporters often store)."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    w = (rng.standard_normal((hidden, hidden)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w"], ["h2"], name="mid"),
        *([] if copy else [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="tie")]),
        helper.make_node("MatMul", ["h2", "table_t"], ["z"], name="proj"),
        helper.make_node("Reshape", ["z", "shape"], ["logits"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([0, 0, vocab], np.int64), "shape"),
         *([numpy_helper.from_array(np.ascontiguousarray(table.T), "table_t")] if copy else [])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _config(lm_head: LMHead, embeddings: bool) -> QuantizeConfig:
    return QuantizeConfig(weights=WeightConfig(block_size=32),
                          selection=Selection(lm_head=lm_head, quantize_embeddings=embeddings, min_elements=0))


def _nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op]


@pytest.mark.parametrize("copy", [False, True])
def test_tied_roles_and_8bit_head_stored_once(copy):
    src = _tied_lm(copy=copy)
    roles = find_roles(ir.from_proto(src).graph)
    assert roles.lm_head.name == "proj" and roles.embedding.name == "embed" and roles.tied
    res = quantize(src, _config(LMHead.INT8, embeddings=True))
    nbits = {n.name.split("_")[0]: n.attributes.get_int("bits") for n in _nodes(res.model, "MatMulNBits")}
    gathers = _nodes(res.model, "GatherBlockQuantized")
    assert nbits == {"mid": 4, "proj": 8} and gathers[0].attributes.get_int("bits") == 8
    # stored once: the lm_head reads the Gather's packed table (through a Reshape), no float copy is left
    head = next(n for n in _nodes(res.model, "MatMulNBits") if n.name.startswith("proj"))
    assert head.inputs[1].producer().inputs[0] is gathers[0].inputs[0]
    assert head.inputs[2] is gathers[0].inputs[2]  # the same scales
    proto = ir.to_proto(res.model)
    assert not any(i.name in ("table", "table_t") for i in proto.graph.initializer)
    ids = np.array([[1, 5, 7, 95]], np.int64)
    ref = run(src, {"input_ids": ids})[0]
    out = run(proto, {"input_ids": ids})[0]
    assert cosine(out, ref) > 0.99


def test_float_head_keeps_tied_table_float():
    src = _tied_lm()
    res = quantize(src, _config(LMHead.FLOAT, embeddings=True))
    assert [n.name for n in _nodes(res.model, "MatMul")] == ["proj"]
    assert not _nodes(res.model, "GatherBlockQuantized")
    skipped = {layer.name: layer.reason for layer in res.report.layers if layer.status == "skipped"}
    assert "--lm-head float" in skipped["proj"] and "tied to the lm_head" in skipped["embed"]
    proto = ir.to_proto(res.model)
    table = next(i for i in proto.graph.initializer if i.name == "table")
    assert np.array_equal(numpy_helper.to_array(table), numpy_helper.to_array(src.graph.initializer[0]))


@pytest.mark.parametrize("mode, head_op, head_bits", [(LMHead.SAME, "MatMulNBits", 4), (LMHead.INT8, "MatMulNBits", 8),
                                                      (LMHead.FLOAT, "MatMul", None)])
def test_lm_head_modes_on_dynamo_export(dynamo_export, mode, head_op, head_bits):
    """The dynamo exporter's lm_head (node_linear_*) is found and treated as asked; others stay 4-bit."""
    name = find_roles(ir.load(dynamo_export).graph).lm_head.name
    res = quantize(dynamo_export, QuantizeConfig(selection=Selection(lm_head=mode)))
    head = next(n for n in res.model.graph if n.name.startswith(name) and n.op_type in ("MatMul", "MatMulNBits"))
    assert head.op_type == head_op
    if head_bits:
        assert head.attributes.get_int("bits") == head_bits
    others = [n for n in _nodes(res.model, "MatMulNBits") if n is not head]
    assert others and all(n.attributes.get_int("bits") == 4 for n in others)


@pytest.mark.parametrize("flags, head_bits", [((), 4), (("--target", "cpu"), 4), (("--lm-head", "8"), 8),
                                               (("--target", "cpu", "--lm-head", "8"), 8)])
def test_lm_head_auto_default(legacy_export, flags, head_bits):
    """auto: like the rest, also with --target cpu (the builder's all-4-bit format decodes fastest);
    8 bits only when asked."""
    from onnxfgq.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["quantize", "m.onnx", *flags]))
    name = find_roles(ir.load(legacy_export).graph).lm_head.name
    res = quantize(legacy_export, config)
    head = next(n for n in _nodes(res.model, "MatMulNBits") if n.name.startswith(name))
    assert head.attributes.get_int("bits") == head_bits
    assert any(name in note for note in res.report.notes)


@pytest.mark.parametrize("flags, hinted", [((), True), (("--symmetric",), False), (("--bits", "8"), False)])
def test_decoder_symmetric_hint(legacy_export, flags, hinted):
    """An asymmetric int4 decoder's report points at --symmetric (the builder's layout, measured more
    accurate on the test LLM); symmetric or 8-bit runs, and models without an lm_head, get no hint."""
    from onnxfgq.api import DECODER_SYMMETRIC_HINT
    from onnxfgq.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["quantize", "m.onnx", *flags]))
    res = quantize(legacy_export, config)
    assert (DECODER_SYMMETRIC_HINT in res.report.notes) is hinted
    mlp_res = quantize(mlp(), config)
    assert DECODER_SYMMETRIC_HINT not in mlp_res.report.notes
