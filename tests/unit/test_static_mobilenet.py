"""Static int8 through the CLI on a MobileNet-style network trained here (models/mobilenet.py): inverted
residual blocks with depthwise Convs, ReLU6 and HardSwish, the kind of stack static int8 finds hard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from onnxfgq.cli import main

ROOT = Path(__file__).resolve().parents[2]
CORE = ("Conv", "MatMul", "Gemm")


@pytest.fixture(scope="module")
def mobilenet_dir() -> Path:
    """Trained once (about a minute on 2 cores), then cached as weights.pt under build/test-models."""
    from models.mobilenet import export

    out = ROOT / "build" / "test-models" / "mobilenet"
    export(out)
    return out


def _top1(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].argmax(1)


def test_mobilenet_static_int8_cli_keeps_fp32_accuracy(mobilenet_dir, tmp_path):
    fp32, out, report_path = mobilenet_dir / "model.onnx", tmp_path / "int8.onnx", tmp_path / "report.json"
    # calibrated on training images; evaluated below on held-out ones it never saw
    assert main(["quantize", str(fp32), "-o", str(out), "--activations", "uint8", "--calibration",
                 str(mobilenet_dir / "calib"), "--no-eval", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    core = [lay for lay in report["layers"] if lay["op_type"] in CORE]
    done = [lay for lay in core if lay["status"] == "quantized" and "16" not in lay["format"]]
    assert len(core) >= 18 and len(done) >= 0.9 * len(core)  # 18 of 18 measured
    weights = [i for i in onnx.load(str(out)).graph.initializer
               if i.data_type == TensorProto.INT8 and i.dims]
    assert len(weights) >= len(done)  # one per-channel int8 weight per quantized Conv/Gemm
    x = np.concatenate([np.load(p)["input"] for p in sorted((mobilenet_dir / "heldout").glob("*.npz"))])
    y = np.load(mobilenet_dir / "heldout_labels.npy")
    ref, got = _top1(fp32, x), _top1(out, x)
    assert (ref == y).mean() >= 0.97  # the FP32 network itself: 0.990 measured
    # measured 0.998 (496 of 497 held-out digits) with the default cosine:0.99 guard
    assert (ref == got).mean() >= 0.98
    assert (got == y).mean() >= (ref == y).mean() - 0.015  # 0.988 vs 0.990 measured
