"""Weight-only quantization on the decoder LM and the CNN: every format x granularity x bits,
checked in onnxruntime against the float model."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfgq import Granularity, OutputFormat, QuantizeConfig, Selection, WeightConfig
from onnxfgq.api import quantize_file
from onnxfgq.graph import io
from tests.helpers import run

GRANULARITIES = [
    (Granularity.TENSOR, 128), (Granularity.CHANNEL, 128), (Granularity.GROUP, 128), (Granularity.GROUP, 32),
]
FORMATS = [OutputFormat.MATMULNBITS, OutputFormat.QDQ]


def _tokens(n=4, length=12, seed=0):
    return np.random.default_rng(seed).integers(3, 259, (n, length)).astype(np.int64)


def _opt_feed(model_path):
    tokens = _tokens()
    names = [v.name for v in io.load(model_path).graph.inputs]
    assert names == ["input_ids", "attention_mask"]
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}


def _top1(a, b):
    return float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity,block", GRANULARITIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_opt_decoder(opt_tiny_dir, tmp_path, fmt, granularity, block, bits):
    src = opt_tiny_dir / "model.onnx"
    out = tmp_path / "q.onnx"
    config = QuantizeConfig(weights=WeightConfig(bits=bits, granularity=granularity, block_size=block, format=fmt),
                            selection=Selection(min_elements=0))
    report = quantize_file(src, out, config)
    assert len(report.quantized) == 13  # 2 layers x (q, k, v, o, fc1, fc2) + lm_head
    feed = _opt_feed(src)
    ref, got = run(src, feed)[0], run(out, feed)[0]
    assert got.shape == ref.shape
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    limit = {8: 0.02, 4: 0.25}[bits] * (2.5 if granularity is Granularity.TENSOR else 1)
    assert rel < limit


@pytest.mark.parametrize("fmt", FORMATS)
def test_opt_tied_embeddings_are_stored_once(opt_tiny_dir, tmp_path, fmt):
    src = opt_tiny_dir / "model.onnx"
    out = tmp_path / "q.onnx"
    config = QuantizeConfig(weights=WeightConfig(block_size=32, format=fmt),
                            selection=Selection(min_elements=0, quantize_embeddings=True))
    report = quantize_file(src, out, config)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["/lm/lm_head/MatMul"].bytes_after == 0  # reuses the token table's storage
    table = by_name["/lm/decoder/embed_tokens/Gather"]
    assert table.status == "quantized" and table.bytes_after > 0
    ops = [n.op_type for n in io.load(out).graph]
    assert ("GatherBlockQuantized" in ops) == (fmt is OutputFormat.MATMULNBITS)
    feed = _opt_feed(src)
    ref, got = run(src, feed)[0], run(out, feed)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.25


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("granularity,block", GRANULARITIES)
@pytest.mark.parametrize("bits", [4, 8])
def test_cnn(cnn_dir, tmp_path, fmt, granularity, block, bits):
    src = cnn_dir / "model.onnx"
    out = tmp_path / "q.onnx"
    op_types = ("Conv", "Gemm", "MatMul") if fmt is OutputFormat.QDQ else ("Gemm", "MatMul")
    config = QuantizeConfig(weights=WeightConfig(bits=bits, granularity=granularity, block_size=block, format=fmt),
                            selection=Selection(op_types=op_types, min_elements=0))
    report = quantize_file(src, out, config)
    kinds = {layer.op_type for layer in report.quantized}
    assert kinds == ({"Conv", "Gemm"} if fmt is OutputFormat.QDQ else {"Gemm"})
    with np.load(sorted((cnn_dir / "heldout").glob("*.npz"))[0]) as batch:
        feed = {k: batch[k] for k in batch.files}
    ref, got = run(src, feed)[0], run(out, feed)[0]
    floor = {8: 0.99, 4: 0.9}[bits] - (0.25 if granularity is Granularity.TENSOR else 0)
    assert _top1(ref, got) >= floor
