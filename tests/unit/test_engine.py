"""engine/runner.py: block-by-block calibrated quantization (``--engine blocks``)."""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.gptq import GPTQ
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.api import quantize, quantize_file
from onnxfgq.config import Algorithm, Granularity, QuantizeConfig, WeightConfig
from tests.helpers import run, write_npz_batches

SIZES = (64, 96, 80, 48)  # x -> W1 -> relu -> W2 -> relu -> W3


def _deep_mlp(seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for k, n in itertools.pairwise(SIZES)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", SIZES[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", SIZES[-1]])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ws


def _reference(ws: list[np.ndarray], batches: list[np.ndarray], *, sequential: bool) -> list[np.ndarray]:
    """GPTQ layer after layer in numpy: each layer's Hessian from the outputs of the layers before it,
    quantized (sequential) or float."""
    acts, out = batches, []
    for i, w in enumerate(ws):
        st = ActivationStats()
        for x in acts:
            st.update(x)
        wq = GPTQ(st, damp=0.01, act_order=True).solve(w, QuantSpec(4, (32, 1), False)).dequantize()
        out.append(wq)
        feed_w = wq if sequential else w
        acts = [np.maximum(x @ feed_w, 0) if i < len(ws) - 1 else x @ feed_w for x in acts]
    return out


def _forward(ws: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    for i, w in enumerate(ws):
        x = x @ w
        if i < len(ws) - 1:
            x = np.maximum(x, 0)
    return x


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """The temporary folder the engine's activation cache goes to, to check it is removed."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize("sequential", [False, True])
def test_each_block_is_calibrated_on_the_float_or_quantized_blocks_before_it(tmp_path, private_tmp, sequential):
    """Default: every block's statistics from the float blocks before it (the whole-model path's);
    --sequential: from the quantized blocks before it (GPTQ's sequential mode)."""
    model, ws = _deep_mlp()
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((16, SIZES[0])).astype(np.float32) for _ in range(4)]
    data = write_npz_batches(tmp_path / "calib", batches)
    wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration=str(data), calibration_samples=64,
                      calibration_batch_size=16, engine="blocks", gptq_sequential=sequential)
    res = quantize(model, QuantizeConfig(weights=wc))
    assert any("block by block" in n and "3 blocks" in n for n in res.report.notes), res.report.notes
    x = rng.standard_normal((8, SIZES[0])).astype(np.float32)
    got = run(ir.to_proto(res.model), {"x": x})[0]
    want = _forward(_reference(ws, batches, sequential=sequential), x)
    other = _forward(_reference(ws, batches, sequential=not sequential), x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(other - want).max() > 1e-2 * scale  # the two modes are told apart
    assert list(private_tmp.iterdir()) == []  # the activation cache is gone


def test_blocks_engine_equals_the_whole_model_path_without_sequential(tmp_path):
    """Without --sequential the block engine's statistics are the whole-model path's: same output."""
    model, _ = _deep_mlp(3)
    rng = np.random.default_rng(4)
    data = write_npz_batches(tmp_path / "calib", [rng.standard_normal((16, SIZES[0])).astype(np.float32)
                                                  for _ in range(4)])
    feed = {"x": rng.standard_normal((8, SIZES[0])).astype(np.float32)}
    outs = {}
    for engine in ("whole", "blocks"):
        wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration=str(data), calibration_samples=64,
                          calibration_batch_size=16, engine=engine)
        outs[engine] = run(ir.to_proto(quantize(model, QuantizeConfig(weights=wc)).model), feed)[0]
    assert np.abs(outs["blocks"] - outs["whole"]).max() <= 1e-5 * np.abs(outs["whole"]).max()


def test_opt_decoder_blockwise_tracks_fp32_as_well_as_whole_model(opt_tiny_dir, private_tmp):
    path = opt_tiny_dir / "model.onnx"
    ids = np.random.default_rng(0).integers(0, 256, (4, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = run(str(path), feed)[0]
    errors = {}
    for engine in ("whole", "blocks"):
        wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random", calibration_samples=16,
                          calibration_batch_size=8, engine=engine)
        res = quantize(path, QuantizeConfig(weights=wc))
        quantized = [layer for layer in res.report.layers if layer.status == "quantized"]
        assert len(quantized) >= 13 and all(layer.output_sqnr_db is not None for layer in quantized)
        out = run(ir.to_proto(res.model), feed)[0]
        errors[engine] = float(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
    assert errors["blocks"] <= errors["whole"] * 1.1, errors
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("kw", [dict(algorithm=Algorithm("awq+gptq+clip")),
                                dict(algorithm=Algorithm.GPTQ, granularity=Granularity.ADAPTIVE, max_error=0.01)],
                         ids=["awq", "adaptive"])
def test_awq_and_adaptive_layouts_block_by_block_equal_the_whole_model(opt_tiny_dir, private_tmp, kw):
    """AWQ scales (with their graph edits) and adaptive layouts chosen block by block, from the
    statistics the whole-model planner sees: the same model to float rounding."""
    path = opt_tiny_dir / "model.onnx"
    ids = np.random.default_rng(0).integers(0, 256, (4, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    outs, reports = {}, {}
    for engine in ("whole", "blocks"):
        wc = WeightConfig(block_size=32, calibration="random", calibration_samples=16, calibration_batch_size=8,
                          engine=engine, **kw)
        res = quantize(path, QuantizeConfig(weights=wc))
        outs[engine], reports[engine] = run(ir.to_proto(res.model), feed)[0], res.report
    assert any("chosen block by block" in n for n in reports["blocks"].notes), reports["blocks"].notes
    layers = {e: [(la.name, la.block, la.detail.split(" (")[0]) for la in r.layers if la.status == "quantized"]
              for e, r in reports.items()}
    assert layers["blocks"] == layers["whole"]
    if "awq" in kw["algorithm"].parts:
        assert sum("awq alpha" in d for _, _, d in layers["blocks"]) >= 4, layers["blocks"]
    else:
        assert len({b for _, b, _ in layers["blocks"]}) >= 2, layers["blocks"]  # layouts differ per layer
    ref = run(str(path), feed)[0]
    assert np.abs(outs["blocks"] - outs["whole"]).max() <= 1e-4 * np.abs(ref).max()
    assert list(private_tmp.iterdir()) == []


def test_target_bits_with_blocks_engine_says_it_uses_the_whole_model(opt_tiny_dir):
    wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random", calibration_samples=8,
                      calibration_batch_size=8, engine="blocks", target_bits=6.0)
    res = quantize(opt_tiny_dir / "model.onnx", QuantizeConfig(weights=wc))
    assert any(n.startswith("--engine blocks: --target-bits") for n in res.report.notes), res.report.notes


def test_generated_llama_quantizes_block_by_block(tmp_path, private_tmp):
    """tools/make_large_llama.py at toy size: 2 layers cut into 5 blocks, GPTQ through them as good as
    through the whole model."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    from make_large_llama import build

    path = build(tmp_path / "llama", layers=2, hidden=64, ffn=160, vocab=300, heads=4)
    from onnxfgq.engine.blocks import partition

    assert len(partition(ir.load(path))) == 5
    ids = np.random.default_rng(0).integers(0, 300, (2, 16))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = run(str(path), feed)[0]
    errors = {}
    for engine in ("whole", "blocks"):
        wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random", calibration_samples=8,
                          calibration_batch_size=4, engine=engine)
        out_path = tmp_path / f"{engine}.onnx"
        quantize_file(path, out_path, QuantizeConfig(weights=wc))
        out = run(str(out_path), feed)[0]
        errors[engine] = float(np.mean((out - ref) ** 2) / np.mean(ref ** 2))
    assert errors["blocks"] <= errors["whole"] * 1.1, errors
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("parts", ["gptq", "gptq+clip", "clip"])
def test_column_chunked_solve_is_exact(parts):
    """A wide weight solved 128 columns at a time gives the codes and scales of one solve."""
    from onnxfgq.calibrated import _solver
    from onnxfgq.engine.runner import ColumnChunks

    rng = np.random.default_rng(3)
    st = ActivationStats()
    st.update(rng.standard_normal((300, 200)).astype(np.float32) * rng.uniform(0.1, 3, 200).astype(np.float32))
    w = rng.standard_normal((200, 300)).astype(np.float32)
    spec = QuantSpec(4, (64, 1), False)
    wc = WeightConfig(algorithm=Algorithm(parts), calibration="random")
    whole = _solver(wc, st).solve(w, spec)
    chunked = ColumnChunks(_solver(wc, st), columns=128).solve(w, spec)
    # the same solve, up to float rounding in BLAS products of other shapes
    assert np.mean(chunked.codes == whole.codes) >= 0.999
    np.testing.assert_allclose(chunked.qparams.scale, whole.qparams.scale, rtol=1e-5)
    assert np.mean(chunked.qparams.zero_point == whole.qparams.zero_point) >= 0.999
    np.testing.assert_allclose(chunked.dequantize(), whole.dequantize(), rtol=1e-4, atol=1e-5)


def test_plain_progress_lines_are_periodic_with_an_estimate():
    """stderr not a terminal: a line at most every 10 s (done/total, elapsed, what is left), one at the end
    of a long loop, and one per block step whatever its length."""
    import io

    from onnxfgq.cli.console import plain_progress

    ticks = iter(range(0, 1000, 4))  # each item takes 4 s on this clock
    out = io.StringIO()
    items = list(plain_progress(range(10), 10, "quantizing", stream=out, clock=lambda: next(ticks)))
    assert items == list(range(10))
    assert out.getvalue().splitlines() == [
        "onnxfgq: quantizing: 3/10, 12 s elapsed, about 28 s left",
        "onnxfgq: quantizing: 6/10, 24 s elapsed, about 16 s left",
        "onnxfgq: quantizing: 9/10, 36 s elapsed, about 4.0 s left",
        "onnxfgq: quantizing: 10 done in 40 s"]
    quick, steps = io.StringIO(), io.StringIO()
    list(plain_progress(range(3), 3, "quantizing", stream=quick, clock=lambda: 0.0))
    list(plain_progress(range(2), 2, "block 2/9 statistics", stream=steps, clock=lambda: 0.0))
    assert quick.getvalue() == ""  # a short run stays quiet
    assert steps.getvalue() == "onnxfgq: block 2/9 statistics: 2 done in 0.0 s\n"


def test_engine_auto_goes_block_by_block_above_the_threshold(tmp_path, monkeypatch):
    """--engine auto (the default): the whole model for small models, blocks above AUTO_BLOCKS_BYTES
    (here lowered to the test model's size) or with --gptaq; the report says which and why."""
    import onnxfgq.config as config_module

    model, _ = _deep_mlp(5)
    rng = np.random.default_rng(6)
    data = write_npz_batches(tmp_path / "calib", [rng.standard_normal((16, SIZES[0])).astype(np.float32)
                                                  for _ in range(2)])
    wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration=str(data), calibration_samples=32,
                      calibration_batch_size=16)
    assert wc.engine == "auto"
    small = quantize(model, QuantizeConfig(weights=wc)).report
    assert "--engine auto: calibrated on the whole model" in " ".join(small.notes)
    assert small.config["weights"]["engine"] == "whole"
    monkeypatch.setattr(config_module, "AUTO_BLOCKS_BYTES", 1000)
    big = quantize(model, QuantizeConfig(weights=wc)).report
    assert "--engine auto: calibrated block by block" in " ".join(big.notes), big.notes
    assert any("block by block on" in n for n in big.notes) and big.config["weights"]["engine"] == "blocks"
    monkeypatch.setattr(config_module, "AUTO_BLOCKS_BYTES", 1 << 40)
    assert WeightConfig(algorithm=Algorithm.GPTQ, gptaq=True).resolved_engine(0) == "blocks"
    assert WeightConfig(engine="whole").resolved_engine(1 << 50) == "whole"
