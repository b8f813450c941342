"""Honest numbers (issue 10, item 11 and the unclear size message): non-finite outputs are never
reported as agreement, NaN weights are refused by name, the JSON report stays valid JSON."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from onnxfgq.cli import main
from onnxfgq.evaluate import OutputAgreement
from onnxfgq.quant import sqnr_db
from onnxfgq.report import size_change
from tests.helpers import mlp


def _agreement(ref, out) -> dict:
    a = OutputAgreement()
    a.update(np.asarray(ref, np.float32), np.asarray(out, np.float32))
    return a.metrics(with_top1=True)


def test_nonfinite_outputs_give_nan_metrics_and_counts():
    ref = np.ones((4, 8), np.float32)
    out = ref.copy()
    out[1, 2] = np.nan
    out[3, 0] = np.inf
    m = _agreement(ref, out)
    assert np.isnan(m["cosine_mean"]) and np.isnan(m["cosine_min"]) and np.isnan(m["sqnr_db"])
    assert m["nonfinite_candidate"] == 2 and m["nonfinite_reference"] == 0
    both = _agreement(np.full((2, 3), np.inf), np.full((2, 3), np.inf))  # was "cosine 1.0000, sqnr inf"
    assert np.isnan(both["cosine_mean"]) and np.isnan(both["sqnr_db"]) and both["nonfinite_reference"] == 6


def test_zero_rows_agree_only_with_zero_rows():
    ref = np.zeros((2, 4))
    assert _agreement(ref, ref)["cosine_mean"] == 1.0 and _agreement(ref, ref)["sqnr_db"] == float("inf")
    out = np.array([[0, 0, 0, 0], [1, 0, 0, 0]], np.float32)
    m = _agreement(ref, out)
    assert m["cosine_mean"] == 0.5 and m["cosine_min"] == 0.0 and m["sqnr_db"] == float("-inf")
    rng = np.random.default_rng(0)
    r = rng.standard_normal((16, 32))
    o = r + 0.01 * rng.standard_normal((16, 32))
    m = _agreement(r, o)
    cos = (r * o).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(o, axis=1)
    assert abs(m["cosine_mean"] - cos.mean()) < 1e-6
    assert abs(m["sqnr_db"] - 10 * np.log10((r ** 2).sum() / ((r - o) ** 2).sum())) < 1e-3


def test_weight_sqnr_of_huge_weights_is_finite():
    w = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 1e25  # squares overflow float32
    assert abs(sqnr_db(w, w * 1.001) - 60.0) < 0.1
    assert np.isnan(sqnr_db(np.array([np.nan, 1.0]), np.array([0.0, 1.0])))


def test_size_message_says_larger_when_the_output_grew():
    assert size_change(1000, 250) == "4.00x smaller"
    assert size_change(1000, 1120) == "12% larger"


def _with_w1(tmp_path, values) -> str:
    m = mlp()
    w1 = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w1.flat[: len(values)] = values
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "w1"))
    path = tmp_path / "model.onnx"
    onnx.save(m, path)
    return str(path)


def test_nan_weight_is_refused_by_name_and_the_report_says_nan(tmp_path, capsys):
    src = _with_w1(tmp_path, [np.nan, np.inf])
    report = tmp_path / "report.json"
    assert main(["quantize", src, "-o", str(tmp_path / "q.onnx"), "--report", str(report),
                 "--eval-samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "weight has 2 non-finite values (NaN/Inf): kept float" in text
    assert "cosine_mean 1.0000" not in text and "cosine_mean nan" in text and "warning:" in text
    data = json.loads(report.read_text())  # valid JSON: NaN written as the string "nan"
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert layers["fc1"]["status"] == "skipped" and layers["fc2"]["status"] == "quantized"
    assert data["accuracy"]["metrics"]["cosine_mean"] == "nan"
    assert data["accuracy"]["metrics"]["nonfinite_reference"] > 0


def test_huge_weights_overflowing_the_outputs_are_not_agreement(tmp_path, capsys):
    src = _with_w1(tmp_path, np.full(123 * 96, 3e37, np.float32))  # outputs overflow to inf in both models
    assert main(["quantize", src, "-o", str(tmp_path / "q.onnx"), "--eval-samples", "4"]) == 0
    text = capsys.readouterr().out
    assert "cosine_mean 1.0000" not in text and "sqnr_db inf" not in text
    assert "cosine_mean nan" in text
