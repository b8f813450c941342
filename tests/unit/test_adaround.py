"""Issue 14's rounding pass (AdaRound) and 16-bit activations for the guard's sensitive nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxfgq.algorithms.adaround import GroupGram, adaround, conv_patches, output_error
from onnxfgq.calibration.sources import open_source
from onnxfgq.cli.args import build_parser, config_from_args
from onnxfgq.config import ActivationConfig, ObserverKind, QuantizeConfig
from onnxfgq.static import quantize_static


def _conv_model(w: np.ndarray, **attrs) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1] * attrs.get(
                                  "group", 1), "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_conv_patches_reproduce_the_conv():
    """Patches times the weight rows are the Conv's output (stride, asymmetric pads, dilation, groups)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 3, 3, 2)).astype(np.float32)
    attrs = dict(group=2, strides=[2, 1], pads=[1, 0, 2, 1], dilations=[1, 2])
    x = rng.normal(size=(2, 6, 9, 11)).astype(np.float32)
    y = _run(_conv_model(w, **attrs), x)  # [B, O, Ho, Wo]
    p = conv_patches(x, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2, 10 ** 6, rng)  # every position, in order
    rows = w.reshape(2, 3, -1)  # [group, out per group, K]
    got = np.einsum("ngk,gok->ngo", p, rows).reshape(len(p), 6)
    np.testing.assert_allclose(got, y.transpose(0, 2, 3, 1).reshape(-1, 6), rtol=1e-4, atol=1e-4)
    assert conv_patches(x, (3, 2), (2, 1), (1, 0, 2, 1), (1, 2), 2, 7, rng).shape == (7, 2, 18)  # bounded


def test_adaround_beats_nearest_on_its_objective():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4096, 48)) @ rng.normal(size=(48, 48)) + 2.0  # correlated, offset inputs
    gram = GroupGram()
    gram.update(x[:, None, :])
    h = gram.hessian()
    w = rng.normal(0, 0.1, (32, 48))
    scale = np.abs(w).max(1) / 127
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    codes = adaround(w, scale, h, -127, 127)
    assert np.abs(codes - w / scale[:, None]).max() < 1  # only ever the floor or the ceiling
    assert output_error(w, codes * scale[:, None], h) < 0.7 * output_error(w, nearest * scale[:, None], h)


def _correlated_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 1, 12, 12))
    return (base * np.linspace(0.5, 2, 8)[None, :, None, None] + rng.normal(0, 0.3, (n, 8, 12, 12)) + 1.0) \
        .astype(np.float32)


class _Feeds:
    def __init__(self, x: np.ndarray):
        self.it = iter([{"x": x[i:i + 16]} for i in range(0, len(x), 16)])

    def get_next(self):
        return next(self.it, None)


def _weight_codes(model: ir.Model) -> tuple[np.ndarray, np.ndarray]:
    init = model.graph.initializers
    return init["conv.weight_quantized"].const_value.numpy(), init["conv.weight_scale"].const_value.numpy()


def test_adaround_pass_lowers_the_measured_layer_error_and_can_be_off(tmp_path):
    """Held-out inputs, the Conv alone: |conv(x, W_hat) - conv(x, W)|^2 with the pass's codes is well
    below round-to-nearest's; with the pass off the codes are round-to-nearest's."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32)
    proto = _conv_model(w, pads=[1, 1, 1, 1])
    calib, heldout = _correlated_images(128, 3), _correlated_images(64, 4)
    codes = {}
    for on in (False, True):
        act = ActivationConfig(adaround=on, max_error="none", bias_correction=False, cle=False)
        model, report = quantize_static(ir.from_proto(proto), QuantizeConfig(activations=act),
                                        data=lambda: _Feeds(calib))
        codes[on] = _weight_codes(model)
        assert any(n.startswith("adaround:") for n in report.notes) == on
    c, s = codes[False]
    np.testing.assert_array_equal(c, np.clip(np.round(w / s[:, None, None, None]), -127, 127))
    ref = _run(proto, heldout)
    err = {on: float(np.mean((_run(_conv_model((c * s[:, None, None, None]).astype(np.float32), pads=[1, 1, 1, 1]),
                                   heldout) - ref) ** 2)) for on, (c, s) in codes.items()}
    assert err[True] < 0.8 * err[False], err


def test_guard_gives_sensitive_nodes_16_bit_activations(cnn_dir):
    src = str(cnn_dir / "calib")
    out = {}
    for wide in (True, False):
        act = ActivationConfig(observer=ObserverKind.MINMAX, max_error="sqnr:45", num_samples=64,
                               wide_activations=wide)
        out[wide] = quantize_static(ir.load(cnn_dir / "model.onnx"), QuantizeConfig(activations=act),
                                    data=lambda: open_source(src, ir.load(cnn_dir / "model.onnx"), num_samples=2))
    model, report = out[True]
    wide = [lay for lay in report.layers if "16 activations" in lay.format]
    assert wide and all(lay.status == "quantized" and "accuracy guard" in lay.reason for lay in wide)
    assert not [lay for lay in report.layers if lay.status == "skipped"]
    proto = ir.to_proto(model)
    assert proto.opset_import[0].version >= 21
    zps = {i.name: i.data_type for i in proto.graph.initializer}
    assert TensorProto.UINT16 in zps.values() and TensorProto.INT8 in zps.values()
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    _, narrow = out[False]
    assert [lay for lay in narrow.layers if lay.status == "skipped"]  # without it: float
    assert not [lay for lay in narrow.layers if "16 activations" in lay.format]


def test_cli_flags_default_to_the_api():
    def act(*flags):
        return config_from_args(build_parser().parse_args(["quantize", "m.onnx", "-o", "o.onnx", "--activations",
                                                           "uint8", *flags])).activations

    assert (act().adaround, act().wide_activations) == (ActivationConfig().adaround,
                                                          ActivationConfig().wide_activations)
    assert act("--adaround").adaround and not act("--no-adaround").adaround
    assert not act("--no-wide-activations").wide_activations
