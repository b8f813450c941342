"""engine/blocks.py: graphs cut into chains of blocks whose sessions, composed, give the model's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.engine.blocks import partition
from onnxfgq.engine.runner import run_chain, session

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_exports() -> dict[str, Path]:
    """The tiny random Llama (2 layers, GQA, RoPE) through the builder and the torch exporter."""
    from models.llm_exports import export_builder, export_torch, tiny_llama_hf

    base = ROOT / "build" / "test-models" / "blocks-llama"
    hf = tiny_llama_hf(base / "hf")
    torch_model = base / "torch" / "model.onnx"
    if not torch_model.is_file():
        torch_model.parent.mkdir(parents=True, exist_ok=True)
        export_torch(hf, torch_model, dynamo=False)
    builder = base / "genai"
    if not (builder / "model.onnx").is_file():
        export_builder(hf, builder)
    return {"torch": torch_model, "builder": builder / "model.onnx"}


def _feed(model: ir.Model, folder: Path, batch: int = 2, seq: int = 7) -> dict[str, np.ndarray]:
    """Consistent inputs: tokens, a mask with padding in the second row, positions, empty past."""
    rng = np.random.default_rng(0)
    head = None
    genai = folder / "genai_config.json"
    if genai.is_file():
        head = json.loads(genai.read_text())["model"]["decoder"]["head_size"]
        batch = 1  # GroupQueryAttention: one sequence when there is a prompt
    feed = {}
    for v in model.graph.inputs:
        dims = [d if isinstance(d, int) else None for d in v.shape]
        dtype = v.dtype.numpy()
        if v.name == "input_ids":
            feed[v.name] = rng.integers(3, 200, (batch, seq)).astype(dtype)
        elif v.name == "attention_mask":
            mask = np.ones((batch, seq), dtype)
            mask[1:, seq - 2:] = 0
            feed[v.name] = mask
        elif v.name == "token_type_ids":
            feed[v.name] = np.zeros((batch, seq), dtype)
        elif v.name == "position_ids":
            feed[v.name] = np.broadcast_to(np.arange(seq, dtype=dtype), (batch, seq)).copy()
        elif v.name.startswith("past_key_values"):
            feed[v.name] = np.zeros((batch, dims[1], 0, dims[3] or head), dtype)
        else:
            shape = [d if d is not None else batch for d in dims]
            feed[v.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _check_chain(path: Path, min_blocks: int) -> None:
    model = ir.load(path)
    chain = partition(model)
    assert len(chain) >= min_blocks, chain.note
    for block in chain.blocks:
        # a standalone model: it serialises, carries its own weights and loads in onnxruntime
        assert block.outputs and block.nodes
        session(block.model)
    feed = _feed(model, path.parent)
    want = session(model).run(None, feed)
    got = run_chain(chain, feed)
    for name, ref in zip(chain.graph_outputs, want):
        scale = max(float(np.abs(ref).max()), 1e-6)
        assert np.abs(got[name] - ref).max() <= 1e-5 * scale, name


def test_opt_decoder(opt_tiny_dir):
    # 2 layers: attention half + MLP half each, then the final norm and lm_head
    model = ir.load(opt_tiny_dir / "model.onnx")
    assert len(partition(model)) == 5
    _check_chain(opt_tiny_dir / "model.onnx", 5)


def test_minilm_encoder(minilm_dir):
    chain = partition(ir.load(minilm_dir / "model.onnx"))
    assert len(chain) == 12  # 6 post-LN layers, cut after each LayerNorm
    # every block after the first reads the stream and, for attention, the mask (recomputed from
    # the graph input or handed along), never the embedding tables
    for block in chain.blocks[1:]:
        names = {v.name for v in block.model.graph.initializers.values()}
        assert not any("embeddings" in n for n in names), block.index
    _check_chain(minilm_dir / "model.onnx", 12)


def test_cnn(cnn_dir):
    _check_chain(cnn_dir / "model.onnx", 3)


@pytest.mark.parametrize("export", ["torch", "builder"])
def test_kv_cache_decoders(llama_exports, export):
    # torch: Add residuals; builder: fused SkipSimplifiedLayerNormalization with two outputs crossing
    _check_chain(llama_exports[export], 5)


def _parallel_model() -> onnx.ModelProto:
    """h = x @ W; y = h @ A + relu(h @ B): after h, two weighted branches side by side, so no tensor
    between them that every path crosses."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((48, 48)).astype(np.float32), n) for n in "wab"]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "a"], ["p"]),
             helper.make_node("MatMul", ["h", "b"], ["q"]), helper.make_node("Relu", ["q"], ["r"]),
             helper.make_node("Add", ["p", "r"], ["y"])]
    graph = helper.make_graph(nodes, "parallel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_parallel_branches_stay_in_one_block():
    model = ir.from_proto(_parallel_model())
    chain = partition(model)
    assert len(chain) == 2 and chain.blocks[1].cut_in == ["h"]
    assert sorted(chain.blocks[1].model.graph.initializers) == ["a", "b"]
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(run_chain(chain, {"x": x})["y"], session(model).run(None, {"x": x})[0], rtol=1e-5)


def test_graph_without_cut_is_one_block():
    single = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 48])],
        [numpy_helper.from_array(np.eye(48, dtype=np.float32), "w")])
    chain = partition(ir.from_proto(helper.make_model(single, opset_imports=[helper.make_opsetid("", 17)])))
    assert len(chain) == 1 and chain.note == "no cut found: one block"
    x = np.random.default_rng(1).standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(run_chain(chain, {"x": x})["y"], np.maximum(x, 0), rtol=1e-6)


def test_mlp_cut_between_layers():
    from tests.helpers import mlp

    chain = partition(ir.from_proto(mlp()))
    assert len(chain) == 2 and chain.blocks[1].cut_in == ["h"]


def test_max_blocks_merges_cuts(opt_tiny_dir):
    model = ir.load(opt_tiny_dir / "model.onnx")
    chain = partition(model, max_blocks=2)
    assert len(chain) == 2
    feed = _feed(model, opt_tiny_dir)
    np.testing.assert_allclose(run_chain(chain, feed)["logits"], session(model).run(None, feed)[0],
                               rtol=1e-5, atol=1e-6)
