"""Adaptive granularity: coarse blocks for well-behaved matrices, fine ones for outlier-heavy ones;
costs that count scales, zero points and MatMulNBits padding; block sizes differing per node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms.adaptive import Choice, candidate_specs, choose_under_budget, evaluate, storage_bits
from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.stats import weight_error
from onnxfgq.quant import compute_qparams, dequantize, quantize
from tests.helpers import run


def rtn_error(w, spec):
    qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False)
    return weight_error(w, dequantize(quantize(w, qp), qp))


def test_storage_bits_counts_scales_zero_points_and_padding():
    assert storage_bits(256, 10, QuantSpec(4, (128, 1), True), pad_to_power_of_two=False) == 256 * 10 * 4 + 2 * 10 * 32
    asym = storage_bits(256, 10, QuantSpec(4, (128, 1), False), pad_to_power_of_two=False)
    assert asym == 256 * 10 * 4 + 2 * 10 * (32 + 4)
    # K=384 in 256-blocks: MatMulNBits stores 512 codes per column, QDQ only 384
    padded = storage_bits(384, 1, QuantSpec(4, (256, 1), True))
    assert padded == 512 * 4 + 2 * 32
    assert storage_bits(384, 1, QuantSpec(4, (256, 1), True), pad_to_power_of_two=False) == 384 * 4 + 2 * 32


def test_candidates_respect_matmulnbits_block_rules():
    blocks = [s.block_shape[0] for s in candidate_specs(100, 4, False, power_of_two=True, blocks=(0, 64, 48, 8))]
    assert blocks == [100, 64]  # per-channel, and 64; 48 and 8 are not powers of two >= 16
    blocks = [s.block_shape[0] for s in candidate_specs(100, 4, False, power_of_two=False, blocks=(0, 64, 48, 8))]
    assert blocks == [100, 64, 50, 48, 25, 8]  # plus the even splits of K


def test_outlier_heavy_matrix_gets_finer_groups():
    rng = np.random.default_rng(0)
    smooth = rng.standard_normal((512, 64)).astype(np.float32)
    spiky = smooth.copy()
    spiky[rng.integers(0, 512, 40), rng.integers(0, 64, 40)] *= 25.0
    specs = candidate_specs(512, 4, False, power_of_two=True)
    budget = 0.012
    pick_smooth = choose_under_budget(evaluate(smooth, specs, rtn_error), budget)
    pick_spiky = choose_under_budget(evaluate(spiky, specs, rtn_error), budget)
    assert pick_smooth.error <= budget and pick_spiky.error <= budget
    assert pick_spiky.block < pick_smooth.block


def test_choose_under_budget_cheapest_fitting_else_most_accurate():
    c = [Choice(QuantSpec(4, (b, 1), False), e, bits) for b, e, bits in ((512, 0.05, 100), (128, 0.02, 120), (32, 0.01, 160))]
    assert choose_under_budget(c, 0.03).block == 128
    assert choose_under_budget(c, 0.001).block == 32


def test_adaptive_end_to_end_block_sizes_per_node():
    from onnxfgq.api import quantize
    from onnxfgq.config import Granularity, OutputFormat, QuantizeConfig, WeightConfig
    from tests.helpers import mlp

    proto = mlp(k=256, hidden=128, n=64)
    w1 = next(i for i in proto.graph.initializer if i.name == "w1")
    arr = np.frombuffer(w1.raw_data, np.float32).reshape(256, 128).copy()
    arr[::9, ::7] *= 30.0  # fc1 gets outliers, fc2 stays smooth
    w1.raw_data = arr.tobytes()
    cfg = QuantizeConfig(weights=WeightConfig(granularity=Granularity.ADAPTIVE, max_error=0.01,
                                              format=OutputFormat.MATMULNBITS))
    res = quantize(proto, cfg)
    blocks = {layer.name: layer.block for layer in res.report.quantized}
    assert blocks["fc1"] != blocks["fc2"]
    nodes = {n.name: n for n in res.model.graph if n.op_type == "MatMulNBits"}
    sizes = {n.attributes.get_int("block_size") for n in nodes.values()}
    assert len(sizes) == 2
    assert res.report.bits_per_weight() is not None
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    out = run(ir.to_proto(res.model), {"x": x})[0]
    ref = run(proto, {"x": x})[0]
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.98
