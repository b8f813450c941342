"""Mixed precision: the allocation respects the bit budget and spends it on the sensitive layers."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxfgq.algorithms.adaptive import Choice
from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.mixed import BudgetError, allocate, average_bits


def layer(n: int, err4: float, err8: float, block: int = 128) -> list[Choice]:
    per = 32 / block
    return [Choice(QuantSpec(4, (block, 1), True), err4, int(n * (4 + per))),
            Choice(QuantSpec(8, (block, 1), True), err8, int(n * (8 + per)))]


def test_budget_respected_and_sensitive_layer_upgraded():
    sizes = [4096] * 4
    options = [layer(4096, 0.01, 1e-4), layer(4096, 0.2, 1e-3), layer(4096, 0.012, 1e-4), layer(4096, 0.011, 1e-4)]
    picks = allocate(options, sizes, target_bits=5.5)
    assert average_bits(picks, sizes) <= 5.5
    assert [p.spec.bits for p in picks] == [4, 8, 4, 4]
    everything = allocate(options, sizes, target_bits=9.0)
    assert all(p.spec.bits == 8 for p in everything)


def test_budget_too_small_is_an_error():
    with pytest.raises(BudgetError):
        allocate([layer(1000, 0.1, 0.01)], [1000], target_bits=3.0)


@pytest.mark.parametrize("target", [4.5, 6.0])
def test_mixed_end_to_end_report(target):
    from onnxfgq.api import quantize
    from onnxfgq.config import OutputFormat, QuantizeConfig, WeightConfig
    from tests.helpers import mlp, run

    proto = mlp(k=256, hidden=128, n=64)
    cfg = QuantizeConfig(weights=WeightConfig(target_bits=target, block_size=128, format=OutputFormat.QDQ,
                                              calibration="random", calibration_samples=32))
    res = quantize(proto, cfg)
    assert res.report.bits_per_weight() <= target + 1e-9
    bits = {layer.name: layer.bits for layer in res.report.quantized}
    assert set(bits.values()) <= {4, 8}
    if target == 6.0:
        assert 8 in bits.values()
    predicted = [n for n in res.report.notes if n.startswith("predicted (summed per-layer errors")]
    assert len(predicted) == 1 and "for 4-bit g128 everywhere (4.281 bits)" in predicted[0], res.report.notes
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    assert np.all(np.isfinite(run(ir.to_proto(res.model), {"x": x})[0]))


def test_compare_uniform_prices_the_best_single_layout_within_the_budget():
    """The report's comparison: the allocation's summed error against the best layout used everywhere
    that fits the same budget (layouts some layer lacks, or over budget, are not candidates)."""
    from onnxfgq.algorithms.mixed import compare_uniform

    sizes = [4096] * 3
    options = [layer(4096, 0.01, 1e-4), layer(4096, 0.2, 1e-3), layer(4096, 0.012, 1e-4)]
    picks = allocate(options, sizes, target_bits=5.6)  # upgrades the sensitive layer only
    label, bits, uniform, mine = compare_uniform(options, picks, sizes, [1024] * 3, 5.6)
    assert label == "4-bit g128"  # all-8-bit does not fit 5.6
    assert bits == pytest.approx(4.25) and uniform == pytest.approx(0.222)
    assert mine == pytest.approx(0.01 + 1e-3 + 0.012)
    # layers with K <= 128 have one block per channel at --block-size 128: still the same uniform plan
    assert compare_uniform(options, picks, sizes, [1024, 128, 64], 5.6)[0] == "4-bit g128"
    assert compare_uniform(options, picks, sizes, [1024] * 3, 4.0) is None  # nothing uniform fits
    nan = [[Choice(c.spec, float("nan"), c.storage_bits) for c in o] for o in options]
    assert compare_uniform(nan, picks, sizes, [1024] * 3, 5.6) is None


def test_impossible_budget_is_refused_before_calibration(monkeypatch):
    """A --target-bits under what the cheapest layouts store is known from the shapes: refused before
    any calibration data is read (it used to come after calibration and the sensitivity probes)."""
    import onnxfgq.calibrated as calibrated
    from onnxfgq.api import quantize
    from onnxfgq.config import Granularity, QuantizeConfig, WeightConfig
    from tests.helpers import mlp

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the budget was checked")

    monkeypatch.setattr(calibrated, "collect_stats", no_calibration)
    cfg = QuantizeConfig(weights=WeightConfig(target_bits=3.5, granularity=Granularity.ADAPTIVE,
                                              block_size=128, calibration="random", calibration_samples=32))
    with pytest.raises(BudgetError, match="3.5 is below what even the cheapest options need"):
        quantize(mlp(k=256, hidden=128, n=64), cfg)
