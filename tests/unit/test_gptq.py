"""GPTQ against its invariants: never worse than RTN on the calibration output error, any K, static
groups that stay plain per-group qparams; and the end-to-end MiniLM target."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.gptq import GPTQ, gptq
from onnxfgq.algorithms.rtn import RTN
from onnxfgq.algorithms.stats import ActivationStats, output_error
from onnxfgq.quant import compute_qparams


def correlated_layer(k: int, n: int, seed: int = 0, rows: int = 2048):
    """Inputs with correlated channels and a few large ones (what makes GPTQ's updates pay)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) / np.sqrt(k)
    x = rng.standard_normal((rows, k)) @ mix + 0.3 * rng.standard_normal((rows, k))
    x[:, : max(1, k // 50)] *= 8.0
    w = rng.standard_normal((k, n)).astype(np.float32)
    st = ActivationStats()
    st.update(x.astype(np.float32).reshape(8, rows // 8, k))  # [..., K] batches
    return w, st


@pytest.mark.parametrize("k,n,block", [(384, 96, 128), (1536, 64, 128), (123, 77, 32)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_output_error_any_k(k, n, block, act_order):
    w, st = correlated_layer(k, n)
    spec = QuantSpec(4, (block, 1), False)
    h = st.hessian()
    rtn = RTN().solve(w, spec)
    q = GPTQ(st, act_order=act_order).solve(w, spec)
    assert q.codes.shape == (k, n) and q.codes.min() >= 0 and q.codes.max() <= 15
    assert q.qparams.scale.shape == (-(-k // block), n)
    assert output_error(w, q.dequantize(), h) < 0.7 * output_error(w, rtn.dequantize(), h)


def test_act_order_static_groups_are_plain_per_group_qparams():
    w, st = correlated_layer(200, 48, seed=1)
    spec = QuantSpec(4, (64, 1), False)
    q = gptq(w, st.hessian(), spec, act_order=True)
    ref = compute_qparams(w, (64, 1), 4, symmetric=False, signed=False)
    # the groups are the original row blocks (no g_idx): RTN's qparams, only the codes differ
    assert q.qparams.block_shape == (64, 1)
    np.testing.assert_array_equal(q.qparams.scale, ref.scale)
    np.testing.assert_array_equal(q.qparams.zero_point, ref.zero_point)


def test_group_act_order_keeps_plain_groups():
    w, st = correlated_layer(300, 48, seed=4)
    h = st.hessian()
    spec = QuantSpec(4, (64, 1), False)
    grouped = gptq(w, h, spec, act_order=True, group_act_order=True)
    static = gptq(w, h, spec, act_order=True)
    assert grouped.qparams.block_shape == (64, 1) and grouped.qparams.scale.shape == (5, 48)
    # the codes and qparams describe the weight directly: dequantize reproduces what GPTQ chose
    assert output_error(w, grouped.dequantize(), h) <= output_error(w, static.dequantize(), h) * 1.2


def test_gptq_symmetric_and_channel_and_dead_inputs():
    w, st = correlated_layer(96, 32, seed=2)
    st.gram[5, :] = st.gram[:, 5] = 0.0  # an input channel that never fires
    q = gptq(w, st.hessian(), QuantSpec(4, (96, 1), True))
    assert q.symmetric and q.qparams.scale.shape == (1, 32)
    assert np.all(q.dequantize()[5] == 0.0)


def test_gptq_with_clip_not_worse_than_gptq():
    w, st = correlated_layer(256, 64, seed=3)
    spec = QuantSpec(4, (64, 1), False)
    h = st.hessian()
    plain = output_error(w, gptq(w, h, spec).dequantize(), h)
    clipped = output_error(w, gptq(w, h, spec, clip=True).dequantize(), h)
    assert clipped <= plain * 1.05


def test_minilm_gptq_g128_cosine(minilm_dir):
    """The issue's target: int4 g128 weight-only (MatMulNBits), calibrated on calib.txt, mean cosine
    >= 0.99 against FP32 on the 512 different sentences of eval.txt."""
    from onnxfgq.api import quantize
    from onnxfgq.calibration.sources import open_source
    from onnxfgq.config import Algorithm, QuantizeConfig, WeightConfig
    from onnxfgq.evaluate import compare
    from onnxfgq.graph import io

    # damp 0.05 measured 0.9907 (0.9903 with the default 0.01): a little more margin over 0.99
    cfg = QuantizeConfig(weights=WeightConfig(algorithm=Algorithm.AWQ_GPTQ_CLIP, gptq_damp=0.05,
                                              calibration=f"text:{minilm_dir / 'calib.txt'}"))
    result = quantize(minilm_dir / "model.onnx", cfg)
    layers = result.report.quantized
    assert len(layers) == 36 and all(layer.algorithm == "awq+gptq+clip" for layer in layers)
    assert all(layer.block == "g128" for layer in layers)
    out = minilm_dir / "gptq.onnx"
    io.save(result.model, out)
    reader = open_source(f"text:{minilm_dir / 'eval.txt'}", io.load(minilm_dir / "model.onnx"),
                         num_samples=512, batch_size=64)
    metrics, n = compare(minilm_dir / "model.onnx", out, reader)
    assert n == 512
    assert metrics["cosine_mean"] >= 0.99


def test_gptq_on_every_weight_of_the_opt_decoder(opt_tiny_dir):
    """Every MatMul/Gemm of the OPT-architecture model (Gemm with transB, the tied lm_head reached
    through a Transpose) goes through GPTQ, and the model still runs and tracks FP32."""
    import onnx_ir as ir

    from onnxfgq.api import quantize
    from onnxfgq.config import Algorithm, QuantizeConfig, WeightConfig
    from tests.helpers import run

    model = opt_tiny_dir / "model.onnx"
    cfg = QuantizeConfig(weights=WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random",
                                              calibration_samples=16, calibration_batch_size=8))
    res = quantize(model, cfg)
    layers = res.report.quantized
    assert len(layers) >= 13 and all(layer.algorithm == "gptq" for layer in layers)
    assert all(layer.output_sqnr_db is not None for layer in layers if layer.status == "quantized")
    ids = np.random.default_rng(0).integers(0, 256, (2, 24))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref = run(str(model), feed)[0]
    out = run(ir.to_proto(res.model), feed)[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.9  # an untrained model: logits are all noise


def test_bounded_memory_collects_chunk_by_chunk(opt_tiny_dir, monkeypatch):
    """When the statistics of every input would not fit the budget, they are collected a chunk at a
    time right before use; every weight still gets its own Hessian."""
    from onnxfgq import calibrated
    from onnxfgq.api import quantize
    from onnxfgq.config import Algorithm, QuantizeConfig, WeightConfig

    monkeypatch.setattr(calibrated, "GRAM_BUDGET_BYTES", 8 * 64 * 64 * 2)  # two 64-wide inputs
    cfg = QuantizeConfig(weights=WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration="random",
                                              calibration_samples=8, calibration_batch_size=8))
    res = quantize(opt_tiny_dir / "model.onnx", cfg)
    note = next(n for n in res.report.notes if "collected in" in n)
    assert int(note.split("collected in ")[1].split()[0]) >= 4
    quantized = [layer for layer in res.report.layers if layer.status == "quantized"]
    assert len(quantized) >= 13 and all(layer.output_sqnr_db is not None for layer in quantized)
