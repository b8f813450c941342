"""``--format custom`` end to end: the rewriter emits com.onnxfgq::MatMulBlockQuant, onnxruntime runs
it with our library, and the result equals the numpy dequantized reference. Also the automatic
choice of the custom op for what MatMulNBits cannot express."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxfgq
from onnxfgq import Granularity, OutputFormat, QuantizeConfig, Selection, WeightConfig
from onnxfgq.algorithms import RTN, QuantSpec
from onnxfgq.api import quantize_file
from onnxfgq.graph import io
from tests.helpers import mlp, run


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("granularity,block", [(Granularity.GROUP, 48), (Granularity.GROUP, 16),
                                               (Granularity.CHANNEL, 0), (Granularity.TENSOR, 0)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_custom_matches_dequantized_reference(ops_library, tmp_path, bits, granularity, block, symmetric):
    model = mlp()
    config = QuantizeConfig(weights=WeightConfig(bits=bits, granularity=granularity, block_size=block or 128,
                                                 symmetric=symmetric, format=OutputFormat.CUSTOM),
                            selection=Selection(min_elements=0))
    out = tmp_path / "q.onnx"
    report = quantize_file(onnx_path(model, tmp_path), out, config)
    assert len(report.quantized) == 2
    assert [n.op_type for n in io.load(out).graph].count("MatMulBlockQuant") == 2
    x = np.random.default_rng(3).standard_normal((5, 123)).astype(np.float32)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    spec = lambda w: QuantSpec(bits, config.weights.block_shape(w.shape, 0, 1), symmetric)  # noqa: E731
    w1, w2 = inits["w1"], inits["w2"].T
    d1 = RTN().solve(w1, spec(w1)).dequantize()
    d2 = RTN().solve(w2, spec(w2)).dequantize()
    expected = np.maximum(x.astype(np.float64) @ d1, 0) @ d2 + inits["b2"]
    got = run(out, {"x": x}, custom_ops=True)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def onnx_path(model, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("weights,expected", [
    (WeightConfig(bits=3), "custom"),
    (WeightConfig(block_size=48), "custom"),
    (WeightConfig(), "matmulnbits"),
])
def test_auto_format_picks_the_op_that_can_express_it(weights, expected):
    assert weights.resolved_format().value == expected
    result = onnxfgq.quantize(mlp(), QuantizeConfig(weights=weights, selection=Selection(min_elements=0)))
    ops = {n.op_type for n in result.model.graph}
    assert ("MatMulBlockQuant" in ops) == (expected == "custom")


def test_minilm_5bit_block48_custom(ops_library, minilm_dir, tmp_path):
    from onnxfgq.calibration import open_source
    from onnxfgq.evaluate import compare

    out = tmp_path / "q.onnx"
    src = minilm_dir / "model.onnx"
    quantize_file(src, out, QuantizeConfig(weights=WeightConfig(bits=5, block_size=48)))
    reader = open_source(f"text:{minilm_dir / 'eval.txt'}", io.load(src), num_samples=64, batch_size=64)
    metrics, _ = compare(src, out, reader, custom_ops=True)
    assert metrics["cosine_mean"] > 0.98


def test_missing_library_is_a_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    src = onnx_path(mlp(), tmp_path)
    env = {"ONNXFGQ_OPS_LIBRARY": str(tmp_path / "missing.so")}
    res = subprocess.run([sys.executable, "-m", "onnxfgq.cli", "quantize", str(src), "-o", str(tmp_path / "o.onnx"),
                          "--bits", "3", "--min-elements", "0"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "missing.so" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()
