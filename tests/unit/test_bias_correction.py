"""Bias correction (algorithms/bias_correction.py, wired in static.py): the shift it predicts is the
measured mean output shift of the rounded weight, and folding it into the bias lowers the measured
static int8 error of a small model whose inputs have a large mean."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.algorithms.bias_correction import corrected_bias, output_shift
from onnxfgq.config import ActivationConfig, QuantizeConfig
from onnxfgq.graph import external
from onnxfgq.static import quantize_static


def _conv_np(x, w, b, group):
    """Valid (unpadded) conv, NCHW, numpy reference."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    og = o // group
    for oc in range(o):
        g = oc // og
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(kh):
            for j in range(kw):
                out[:, oc] += np.einsum("nchw,c->nhw", xs[:, :, i:i + out.shape[2], j:j + out.shape[3]], w[oc, :, i, j])
        out[:, oc] += b[oc]
    return out


def test_output_shift_is_the_measured_mean_shift():
    rng = np.random.default_rng(0)
    for group, (o, c) in ((1, (6, 4)), (4, (4, 4)), (2, (6, 4))):
        w = rng.normal(size=(o, c // group, 3, 3))
        w_q = w + rng.normal(0, 0.05, w.shape)
        b = rng.normal(size=o)
        mean = rng.normal(3, 1, c)
        x = mean[None, :, None, None] + rng.normal(0, 0.5, (64, c, 8, 8))
        measured = (_conv_np(x, w_q, b, group) - _conv_np(x, w, b, group)).mean(axis=(0, 2, 3))
        xmean = x.mean(axis=(0, 2, 3))  # each kernel tap sees a slightly different window: close, not equal
        np.testing.assert_allclose(output_shift(w, w_q, xmean, group), measured, rtol=0.02)
        fixed = _conv_np(x, w_q, corrected_bias(b, w, w_q, xmean, group).astype(np.float64), group)
        left = np.abs((fixed - _conv_np(x, w, b, group)).mean(axis=(0, 2, 3)))
        assert (left < 0.05 * np.abs(measured)).all()


def _model(seed: int = 0):
    """x (mean 6) -> depthwise 3x3 (16 channels, 9 weights each: rounding errors do not average out)
    -> Relu -> Conv 1x1 (8)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w1", rng.normal(0, 0.3, (16, 1, 3, 3)) * 10.0 ** rng.uniform(-1, 0, (16, 1, 1, 1))),
        ("b1", rng.normal(0, 0.1, 16)), ("w2", rng.normal(0, 0.3, (8, 16, 1, 1))), ("b2", np.zeros(8)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], group=16),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "w2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "bc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _x(seed: int, n: int = 16) -> np.ndarray:
    return (6 + np.random.default_rng(seed).normal(0, 0.5, (n, 16, 10, 10))).astype(np.float32)


class _Reader:
    def __init__(self):
        self.feeds = [{"x": _x(i)} for i in range(4)]

    def get_next(self):
        return self.feeds.pop(0) if self.feeds else None


def test_bias_correction_lowers_static_int8_error():
    proto = _model()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    x = _x(50, 64)
    ref = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = {}
    for bc in (False, True):
        act = ActivationConfig(max_error="none", cle=False, bias_correction=bc)
        q, _ = quantize_static(ir.from_proto(proto), QuantizeConfig(activations=act), data=_Reader)
        got = external.session(q, so).run(None, {"x": x})[0]
        err[bc] = (float(np.abs((got - ref).mean(axis=(0, 2, 3))).mean()), float(((got - ref) ** 2).mean()))
    assert err[True][0] < 0.5 * err[False][0], err  # the systematic part: mean shift per channel
    assert err[True][1] < err[False][1], err  # and the total squared error
