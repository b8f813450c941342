"""Cross-layer equalisation and the constant Mul/Add folds (graph/equalize.py, algorithms/cle.py):
exact in float (checked against onnxruntime on the untouched model), and CLE lowers the static int8
error of a model whose channel ranges are badly balanced (measured end to end)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.algorithms.cle import apply_scales, equalize_scales
from onnxfgq.config import ActivationConfig, QuantizeConfig
from onnxfgq.graph import external
from onnxfgq.graph.equalize import depthwise_pairs, equalize, fold_affines
from onnxfgq.static import equalize_with_data, quantize_static


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _model(seed: int = 0, *, lab: bool = False, hardswish: bool = False):
    """x -> Conv 3x3 (8) -> Relu -> depthwise 3x3 (8) -> Relu -> Conv 1x1 (6), output channels of the
    first two convs spread over 3 decades (what CLE is for). ``lab``: PP-OCR-style constant Mul/Add
    around the convs; ``hardswish``: HardSigmoid * x instead of the second Relu."""
    rng = np.random.default_rng(seed)
    spread = 10.0 ** rng.uniform(-1.5, 1.5, 8)
    w1 = rng.normal(0, 0.3, (8, 3, 3, 3)) * spread[:, None, None, None]
    w2 = rng.normal(0, 0.3, (8, 1, 3, 3)) / spread[:, None, None, None] * 10.0 ** rng.uniform(-1, 1, 8)[:, None, None, None]
    w3 = rng.normal(0, 0.3, (6, 8, 1, 1))
    inits = [_init("w1", w1), _init("b1", rng.normal(0, 0.1, 8) * spread), _init("w2", w2),
             _init("b2", rng.normal(0, 0.1, 8)), _init("w3", w3), _init("b3", rng.normal(0, 0.1, 6)),
             _init("a", [0.7]), _init("c", [0.2]), _init("cv", rng.normal(0, 0.2, (1, 8, 1, 1))),
             _init("pa", rng.uniform(0.5, 2, (1, 8, 1, 1))), _init("pc", [0.05])]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1])]
    prev = "c1"
    if lab:
        nodes += [helper.make_node("Add", ["c1", "cv"], ["c1a"])]
        prev = "c1a"
    nodes += [helper.make_node("Relu", [prev], ["r1"])]
    prev = "r1"
    if lab:  # scale + shift before a padded depthwise conv
        nodes += [helper.make_node("Mul", ["pa", "r1"], ["m1"]), helper.make_node("Add", ["m1", "pc"], ["s1"])]
        prev = "s1"
    nodes += [helper.make_node("Conv", [prev, "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8)]
    if hardswish:
        nodes += [helper.make_node("HardSigmoid", ["c2"], ["hs"], alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["hs", "c2"], ["r2"])]
    else:
        nodes += [helper.make_node("Relu", ["c2"], ["r2"])]
    prev = "r2"
    if lab:  # scale + shift before an unpadded conv: both fold
        nodes += [helper.make_node("Mul", ["r2", "a"], ["m2"]), helper.make_node("Add", ["m2", "c"], ["s2"])]
        prev = "s2"
    nodes += [helper.make_node("Conv", [prev, "w3", "b3"], ["y"])]
    graph = helper.make_graph(nodes, "cle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if isinstance(model, ir.Model):
        return external.session(model, so).run(None, {"x": x})[0]
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _x(seed: int, n: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 12, 12)).astype(np.float32)


def test_equalize_scales_balance_ranges_exactly():
    rng = np.random.default_rng(1)
    w1 = rng.normal(size=(5, 4, 3, 3)) * np.array([100, 1, 0.01, 3, 0.3])[:, None, None, None]
    w2 = rng.normal(size=(7, 5, 1, 1))
    s = equalize_scales(w1, w2, 1)
    n1, _, n2 = apply_scales(w1, None, w2, 1, s)
    r1 = np.abs(n1.reshape(5, -1)).max(1)
    r2 = np.abs(np.moveaxis(n2, 1, 0).reshape(5, -1)).max(1)
    np.testing.assert_allclose(r1, r2, rtol=1e-9)  # each channel: both sides sqrt(r1 * r2)
    # the product through a positive scale is unchanged: w2 @ (w1 / s) * s
    np.testing.assert_allclose(np.einsum("oc,cikl->oikl", n2[:, :, 0, 0], n1),
                               np.einsum("oc,cikl->oikl", w2[:, :, 0, 0], w1), rtol=1e-9)


def test_cle_and_affine_folds_are_exact_in_float():
    proto = _model(lab=True)
    model = ir.from_proto(proto)
    notes = fold_affines(model) + equalize(model)
    # the Add after conv 1, the Mul before the padded conv 2 (its Add moved in front), Mul and Add before conv 3
    assert any("folded 4 constant" in n for n in notes), notes
    # conv 2 -> conv 3 only: the moved Add between conv 1's Relu and conv 2 is not homogeneous
    assert any("1 Conv pair(s) equalised" in n for n in notes), notes
    ops = [n.op_type for n in model.graph]
    assert ops.count("Mul") == 0 and ops.count("Add") == 1  # the shift before the padded conv stays, moved
    x = _x(2)
    ref, got = _run(proto, x), _run(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cle_is_not_applied_through_hardswish():
    model = ir.from_proto(_model(hardswish=True))
    notes = equalize(model)
    # conv 1 -> Relu -> depthwise conv 2 is left to activation equalisation; conv 2 -> HardSwish -> conv 3 alone
    assert any("0 Conv pair(s) equalised" in n for n in notes), notes
    assert any("1 pair(s) through HardSwish" in n for n in notes), notes
    assert [t for *_, t in depthwise_pairs(model)] == ["r1"]


def test_activation_equalisation_is_exact_and_balances_channels():
    proto = _model(seed=4)
    model = ir.from_proto(proto)
    act = ActivationConfig()
    before, notes = equalize_with_data(model, act, lambda: _Reader(20))
    assert any("1 Conv -> depthwise Conv pair(s) rescaled" in n for n in notes), notes
    after, _ = equalize_with_data(model, act, lambda: _Reader(20))  # measured again on the rescaled model
    spread = {k: max(v) / min(v) for k, v in (("before", before["r1"]), ("after", after["r1"]))}
    assert spread["before"] > 100 and spread["after"] < 0.02 * spread["before"], spread
    x = _x(5)
    ref, got = _run(proto, x), _run(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class _Reader:
    def __init__(self, seed: int):
        self.feeds = [{"x": _x(seed + i)} for i in range(4)]

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def _sqnr(ref, got):
    return 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())


def test_cle_lowers_static_int8_error():
    proto = _model(seed=3)
    x = _x(100, 32)
    ref = _run(proto, x)
    sqnr = {}
    for cle in (False, True):
        act = ActivationConfig(max_error="none", cle=cle, bias_correction=False)
        q, report = quantize_static(ir.from_proto(proto), QuantizeConfig(activations=act), data=lambda: _Reader(10))
        assert all(lay.status == "quantized" for lay in report.layers)
        sqnr[cle] = _sqnr(ref, _run(q, x))
    assert sqnr[True] > sqnr[False] + 3, sqnr
