"""algorithms/gptaq.py and ``--gptaq`` in the block engine: GPTQ aimed at the float model's output."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.gptaq import GPTAQ, PairedStats
from onnxfgq.algorithms.gptq import GPTQ
from onnxfgq.api import quantize
from onnxfgq.config import Algorithm, ConfigError, QuantizeConfig, WeightConfig
from tests.helpers import run, write_npz_batches
from tests.unit.test_engine import SIZES, _deep_mlp, _forward
from tests.unit.test_resume import _config as _resume_config
from tests.unit.test_resume import llama  # noqa: F401  (the fixture)

SPEC = QuantSpec(4, (32, 1), False)


def _perturbed(rows_seed: int = 0, n: int = 4000, k: int = 96, noise: float = 0.3, random: float = 0.1):
    """Float inputs ``x`` and the inputs ``xq`` an earlier, quantized layer hands on instead: ``x`` plus
    an error that partly depends on ``x`` (a distortion a later layer can partly undo) and partly not.
    The layer ``w`` and the distortion are fixed; ``rows_seed`` draws the rows."""
    fixed = np.random.default_rng(0)
    mix = (fixed.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    w = fixed.standard_normal((k, 48)).astype(np.float32)
    rng = np.random.default_rng(100 + rows_seed)
    x = (rng.standard_normal((n, k)) * np.linspace(0.3, 2.0, k)).astype(np.float32)
    xq = x + noise * (x @ mix) + random * noise * rng.standard_normal((n, k)).astype(np.float32)
    return x, xq, w


def _paired(x: np.ndarray, xq: np.ndarray, batches: int = 4) -> PairedStats:
    st = PairedStats()
    for a, b in zip(np.array_split(xq, batches), np.array_split(x, batches)):
        st.update_pair(a, b)
    return st


def _error(x, xq, w, q) -> float:
    """Relative output error of the quantized layer on its real inputs against the float model's output."""
    return float(np.sum((xq @ q - x @ w) ** 2) / np.sum((x @ w) ** 2))


def test_paired_stats_accumulate_the_cross_gram():
    x, xq, _ = _perturbed(n=300)
    st = _paired(x, xq, batches=3)
    np.testing.assert_allclose(st.hessian(), xq.T.astype(np.float64) @ xq / 300, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(st.cross_hessian(), xq.T.astype(np.float64) @ x / 300, rtol=1e-4, atol=1e-4)


def test_paired_stats_keep_a_small_shift_exact():
    """``C - H = X~^T (X - X~) / n`` is accumulated from the inputs' difference: at a perturbation of
    1e-5 of the inputs it still matches the float64 reference to 1e-4 of its own size (the difference
    of two float32-accumulated Gram matrices would be mostly rounding noise), and it is exactly zero
    when the paths agree."""
    x, _, _ = _perturbed(n=2000)
    xq = x + np.float32(1e-5) * np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    st = _paired(x, xq)
    x64, xq64 = x.astype(np.float64), xq.astype(np.float64)
    ref = xq64.T @ (x64 - xq64) / len(x)
    assert np.abs(st.shift_hessian() - ref).max() <= 1e-4 * np.abs(ref).max()
    assert not np.any(_paired(x, x).shift_hessian())


def test_target_is_the_least_squares_fit_of_the_float_output():
    x, xq, w = _perturbed(n=2000)
    target, alpha = GPTAQ(_paired(x, xq), alpha=1.0, damp=1e-6).target(w)
    assert alpha == 1.0
    lstsq = np.linalg.lstsq(xq.astype(np.float64), x.astype(np.float64) @ w, rcond=None)[0]
    assert np.abs(target - lstsq).max() <= 1e-3 * np.abs(lstsq).max()


def test_asymmetric_gptq_reduces_the_error_against_the_float_output():
    x, xq, w = _perturbed()
    st = _paired(x, xq)
    plain = _error(x, xq, w, GPTQ(st).solve(w, SPEC).dequantize())
    half = _error(x, xq, w, GPTAQ(st, alpha=0.5).solve(w, SPEC).dequantize())
    full = _error(x, xq, w, GPTAQ(st, alpha=1.0).solve(w, SPEC).dequantize())
    assert full < half < plain
    assert full < 0.7 * plain, (plain, half, full)
    # on fresh rows of the same distribution too (the correction is not an artefact of the sample)
    x2, xq2, _ = _perturbed(rows_seed=1)
    assert _error(x2, xq2, w, GPTAQ(st, alpha=1.0).solve(w, SPEC).dequantize()) < \
        0.7 * _error(x2, xq2, w, GPTQ(st).solve(w, SPEC).dequantize())


def test_held_out_alpha_is_cautious_with_few_rows_and_bold_with_many():
    """Fitted on few rows per input, to an error that is mostly not a function of the inputs, the
    correction is mostly noise: the alpha chosen on the other half of the batches shrinks it; with many
    rows and a recoverable distortion it keeps most of it."""
    few = GPTAQ(_paired(*_perturbed(n=200, noise=0.3, random=3.0)[:2], batches=8))
    many = GPTAQ(_paired(*_perturbed(n=8000)[:2], batches=8))
    w = _perturbed()[2]
    a_few, a_many = few.held_out_alpha(w), many.held_out_alpha(w)
    assert 0.0 <= a_few < 0.5 < a_many <= 1.0, (a_few, a_many)
    x, xq, _ = _perturbed(rows_seed=1)  # and the chosen target does better than no correction on fresh rows
    assert _error(x, xq, w, many.target(w)[0]) < 0.5 * _error(x, xq, w, w)


def test_unperturbed_inputs_or_alpha_zero_give_plain_gptq():
    x, xq, w = _perturbed(n=1000)
    same = GPTAQ(_paired(x, x)).solve(w, SPEC)
    np.testing.assert_array_equal(same.codes, GPTQ(_paired(x, x)).solve(w, SPEC).codes)
    off = GPTAQ(_paired(x, xq), alpha=0.0).solve(w, SPEC)
    np.testing.assert_array_equal(off.codes, GPTQ(_paired(x, xq)).solve(w, SPEC).codes)


def _reference(ws, batches, alpha):
    """Block by block in numpy: each layer's statistics pair the quantized path's inputs with the
    float path's; the float path runs the float weights."""
    quant, flt, out = batches, batches, []
    for i, w in enumerate(ws):
        st = PairedStats()
        for a, b in zip(quant, flt):
            st.update_pair(a, b)
        wq = GPTAQ(st, alpha=alpha).solve(w, SPEC).dequantize()
        out.append(wq)
        act = (lambda v: np.maximum(v, 0)) if i < len(ws) - 1 else (lambda v: v)
        quant = [act(a @ wq) for a in quant]
        flt = [act(b @ w) for b in flt]
    return out


def test_blocks_engine_pairs_the_quantized_and_float_paths(tmp_path):
    model, ws = _deep_mlp()
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((64, SIZES[0])).astype(np.float32) for _ in range(4)]  # rows > inputs
    data = write_npz_batches(tmp_path / "calib", batches)
    wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration=str(data), calibration_samples=256,
                      calibration_batch_size=64, engine="blocks", gptaq=True, gptaq_alpha=1.0)
    res = quantize(model, QuantizeConfig(weights=wc))
    x = rng.standard_normal((8, SIZES[0])).astype(np.float32)
    got = run(ir.to_proto(res.model), {"x": x})[0]
    want = _forward(_reference(ws, batches, 1.0), x)
    plain = _forward(_reference(ws, batches, 0.0), x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(plain - want).max() > 1e-2 * scale  # GPTAQ and plain GPTQ are told apart
    assert all("GPTAQ alpha 1.00" in layer.detail for layer in res.report.layers), res.report.layers


@pytest.mark.parametrize("kw", [dict(engine="whole"), dict(engine="blocks", algorithm=Algorithm.CLIP),
                                dict(engine="blocks", gptaq_alpha=1.5)])
def test_gptaq_needs_gptq_blocks_and_an_alpha_in_range(kw):
    base = dict(algorithm=Algorithm.GPTQ, calibration="random", gptaq=True)
    with pytest.raises(ConfigError, match="--gptaq"):
        WeightConfig(**{**base, **kw}).validate()


def test_cli_flags_reach_the_config():
    from onnxfgq.cli.args import build_parser, config_from_args

    args = build_parser().parse_args(["quantize", "m.onnx", "--algo", "gptq", "--calibration", "random",
                                      "--engine", "blocks", "--gptaq", "--gptaq-alpha", "0.3"])
    wc = config_from_args(args).weights
    assert (wc.gptaq, wc.gptaq_alpha) == (True, 0.3)
    default = config_from_args(build_parser().parse_args(["quantize", "m.onnx"])).weights
    assert (default.gptaq, default.gptaq_alpha) == (WeightConfig().gptaq, WeightConfig().gptaq_alpha)


def test_interrupted_gptaq_run_resumes_to_the_same_bytes(llama, tmp_path, monkeypatch):
    """The float path's cached tensors are part of the work folder: a resumed ``--gptaq`` run continues
    from them and writes what an uninterrupted run writes."""
    import onnxfgq.graph.io as gio
    from onnxfgq.api import quantize_file

    cfg = _resume_config(gptaq=True, calibration_samples=32, calibration_batch_size=8)
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    reference = tmp_path / "ref" / "q.onnx"
    res = quantize_file(llama, reference, cfg)
    assert any("GPTAQ alpha" in layer.detail and "alpha 0.00" not in layer.detail for layer in res.layers), \
        [layer.detail for layer in res.layers]

    def interrupt(name: str) -> None:
        if name == "block2":
            raise KeyboardInterrupt

    out = tmp_path / "run" / "q.onnx"
    with monkeypatch.context() as m:
        m.setattr(gio, "pause_point", interrupt)
        with pytest.raises(KeyboardInterrupt):
            quantize_file(llama, out, cfg)
    quantize_file(llama, out, cfg, resume=True)
    for name in ("q.onnx", "q.onnx.data"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


def _residual_mlp(seed: int = 0):
    """Two residual layers ``y = x + relu(x W1) W2``. The engine cuts it into 3 blocks (W1 | W2 | the
    second layer): the last holds two weights, the second reading a tensor the first one computes."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    shapes = [(64, 96), (96, 64), (64, 96), (96, 64)]
    ws = [(rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for s in shapes]
    nodes = []
    x = "x"
    for b in range(2):
        w1, w2 = f"w{2 * b}", f"w{2 * b + 1}"
        nodes += [helper.make_node("MatMul", [x, w1], [f"h{b}"]), helper.make_node("Relu", [f"h{b}"], [f"r{b}"]),
                  helper.make_node("MatMul", [f"r{b}", w2], [f"o{b}"]),
                  helper.make_node("Add", [x, f"o{b}"], ["y" if b else "y0"])]
        x = "y0"
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), ws


def _residual_reference(ws, batches, *, sequential: bool):
    """numpy GPTAQ (alpha 1) block by block; inside the last block the second weight is observed with
    the first one quantized (``sequential``) or float (the first layer's two weights are two blocks)."""
    def solve(xq, xf, w):
        st = PairedStats()
        for a, b in zip(xq, xf):
            st.update_pair(a, b)
        return GPTAQ(st, alpha=1.0).solve(w, SPEC).dequantize()

    quant, flt, out = batches, batches, []
    for b in range(2):
        w1, w2 = ws[2 * b], ws[2 * b + 1]
        q1 = solve(quant, flt, w1)
        inner_q = [np.maximum(a @ (q1 if sequential or b == 0 else w1), 0) for a in quant]
        inner_f = [np.maximum(a @ w1, 0) for a in flt]
        q2 = solve(inner_q, inner_f, w2)
        out += [q1, q2]
        quant = [a + np.maximum(a @ q1, 0) @ q2 for a in quant]
        flt = [a + np.maximum(a @ w1, 0) @ w2 for a in flt]
    return out


def _residual_forward(ws, x):
    for b in range(2):
        x = x + np.maximum(x @ ws[2 * b], 0) @ ws[2 * b + 1]
    return x


def test_gptaq_solves_a_block_in_stages_the_later_weights_seeing_the_earlier_quantized(tmp_path):
    model, ws = _residual_mlp()
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(4)]
    data = write_npz_batches(tmp_path / "calib", batches)
    wc = WeightConfig(algorithm=Algorithm.GPTQ, block_size=32, calibration=str(data), calibration_samples=256,
                      calibration_batch_size=64, engine="blocks", gptaq=True, gptaq_alpha=1.0)
    res = quantize(model, QuantizeConfig(weights=wc))
    assert any("3 blocks" in n for n in res.report.notes), res.report.notes
    x = rng.standard_normal((8, 64)).astype(np.float32)
    got = run(ir.to_proto(res.model), {"x": x})[0]
    want = _residual_forward(_residual_reference(ws, batches, sequential=True), x)
    one_pass = _residual_forward(_residual_reference(ws, batches, sequential=False), x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert np.abs(one_pass - want).max() > 1e-3 * scale  # the two orders are told apart
