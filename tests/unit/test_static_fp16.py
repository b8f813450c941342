"""Static int8 on a float16 model (issue 10, item 7): onnxruntime used to reject the QuantizeLinear on
a float16 tensor with a float32 scale in the accuracy guard."""

from __future__ import annotations

import numpy as np
import onnx

from onnxfgq.cli import main
from tests.helpers import cosine, run
from tests.unit.test_rewriter import _fp16_model


def test_float16_model_static_uint8(tmp_path, capsys):
    src, out = tmp_path / "fp16.onnx", tmp_path / "fp16.uint8.onnx"
    model = _fp16_model()
    onnx.save(model, src)
    assert main(["quantize", str(src), "-o", str(out), "--activations", "uint8", "--calibration", "random",
                 "--calib-samples", "32", "--no-eval"]) == 0
    assert "2 of 2 weight nodes quantized" in capsys.readouterr().out
    q = onnx.load(out)
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
    scales = [i for i in q.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(i.data_type == onnx.TensorProto.FLOAT16 for i in scales)
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float16)
    ref, got = run(model, {"x": x})[0], run(q, {"x": x})[0]
    assert got.dtype == np.float16
    assert cosine(ref.astype(np.float32), got.astype(np.float32)) > 0.99
