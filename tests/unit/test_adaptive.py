"""Adaptive granularity: coarse blocks for well-behaved matrices, fine ones for outlier-heavy ones;
costs that count scales, zero points and MatMulNBits padding; block sizes differing per node."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxfgq.algorithms.adaptive import Choice, candidate_specs, choose_under_budget, evaluate, storage_bits
from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.rtn import RTN
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


def _outlier_mlp():
    from tests.helpers import mlp

    proto = mlp(k=256, hidden=128, n=64)
    w1 = next(i for i in proto.graph.initializer if i.name == "w1")
    arr = np.frombuffer(w1.raw_data, np.float32).reshape(256, 128).copy()
    arr[::9, ::7] *= 30.0  # fc1 gets outliers, fc2 stays smooth
    w1.raw_data = arr.tobytes()
    return proto


def _forward(proto, x, replace):
    """The MLP in numpy (relu(x W1) W2^T + b2), with weights from ``replace`` where given."""
    from onnx import numpy_helper

    p = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    p.update(replace)
    return np.maximum(x @ p["w1"], 0.0) @ p["w2"].T + p["b2"]


def test_target_bits_with_gptq_prices_each_layout_by_the_gptq_result():
    """Under --target-bits with GPTQ, each candidate layout's price is the end-to-end output error of
    GPTQ's own result for it (checked here against a numpy forward pass with that one weight swapped),
    not RTN's: GPTQ shrinks some layouts' error far more than others."""
    from onnxfgq.algorithms.gptq import GPTQ
    from onnxfgq.calibrated import open_calibration_source, plan_weights, weight_key
    from onnxfgq.calibration.sources import iterate
    from onnxfgq.config import Algorithm, Granularity, OutputFormat, Selection, WeightConfig
    from onnxfgq.graph.targets import find_targets

    proto = _outlier_mlp()
    model = ir.from_proto(proto)
    targets = [t for t in find_targets(model, Selection()) if t.skip_reason is None]
    wc = WeightConfig(algorithm=Algorithm("gptq"), granularity=Granularity.ADAPTIVE, target_bits=4.6,
                      calibration="random", calibration_samples=64, format=OutputFormat.QDQ)
    plan = plan_weights(model, targets, wc, OutputFormat.QDQ, lambda items, total, label: items)
    feed = next(iterate(open_calibration_source(model, wc, None, num_samples=16, batch_size=16)))
    x = feed["x"].astype(np.float64)
    ref = _forward(proto, x, {})
    rtn_priced = []
    for t in targets:
        p = plan.weights[weight_key(t)]
        w = t.weight()
        wq = GPTQ(p.stats).solve(w, p.spec).dequantize()
        name = t.chain.root.name
        wq = wq.T if t.transposed else wq
        err = float(np.sum((_forward(proto, x, {name: wq}) - ref) ** 2) / np.sum(ref ** 2))
        assert p.estimated_error == pytest.approx(err, rel=1e-3, abs=1e-9)
        rq = RTN().solve(w, p.spec).dequantize()
        rq = rq.T if t.transposed else rq
        rtn_priced.append(float(np.sum((_forward(proto, x, {name: rq}) - ref) ** 2) / np.sum(ref ** 2)))
    assert sum(p.estimated_error for p in plan.weights.values()) < 0.8 * sum(rtn_priced)
