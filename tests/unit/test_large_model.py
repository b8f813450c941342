"""A model over protobuf's 2 GB limit, with external data, end to end (slow: pytest -m slow)."""

from __future__ import annotations

import resource

import numpy as np
import pytest

from onnxfgq import QuantizeConfig
from onnxfgq.api import quantize_file
from onnxfgq.graph import io
from tests.helpers import cosine, run, write_large_model


@pytest.mark.slow
def test_over_2gb_with_external_data(tmp_path):
    src = tmp_path / "large.onnx"
    weight_bytes = write_large_model(src, k=8192, n=12288, layers=6)
    assert weight_bytes > 2**31  # past protobuf's limit
    out = tmp_path / "large.int4.onnx"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = quantize_file(src, out, QuantizeConfig())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert len(report.quantized) == 6
    assert any("2 GB" in note for note in report.notes) or not any("onnxsim" in n for n in report.notes)
    # model.onnx + one external data file, ~1/7 of the float size
    assert (tmp_path / "large.int4.onnx.data").is_file()
    assert report.size_after < weight_bytes / 6
    # one weight at a time: the peak is a few times one 400 MB weight, not the 2.4 GB total
    assert peak - rss_before < 0.6 * weight_bytes, (peak, rss_before, weight_bytes)
    x = np.random.default_rng(1).standard_normal((2, 8192)).astype(np.float32)
    ref = run(src, {"h0": x})[0]
    got = run(out, {"h0": x})[0]
    assert cosine(ref, got) > 0.97
    assert io.load(out).graph.outputs[0].name == "h6"
