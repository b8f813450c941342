"""The command line as a user runs it: real subprocesses, exit codes, one-line errors, no debris."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import cli, mlp, run


@pytest.fixture()
def mlp_path(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(k=256, hidden=128, n=64), path)
    return path


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_quantize_writes_report_and_model(mlp_path, tmp_path):
    out = tmp_path / "out.onnx"
    rep = tmp_path / "r.json"
    res = cli("quantize", str(mlp_path), "-o", str(out), "--block-size", "32", "--report", str(rep))
    assert res.returncode == 0, res.stderr
    assert "2 of 2 weight nodes quantized" in res.stdout
    assert "accuracy vs FP32" in res.stdout
    data = json.loads(rep.read_text())
    assert data["layers_quantized"] == 2 and data["size_after"] < data["size_before"]
    assert data["accuracy"]["metrics"]["cosine_mean"] > 0.95
    assert all(layer["sqnr_db"] > 15 for layer in data["layers"])
    x = np.ones((2, 256), np.float32)
    assert run(out, {"x": x})[0].shape == (2, 64)


def test_default_output_name_and_inspect(mlp_path):
    res = cli("quantize", str(mlp_path), "--min-elements", "0", "--no-eval")
    assert res.returncode == 0, res.stderr
    assert (mlp_path.parent / "mlp.4bit.onnx").is_file()
    res = cli("inspect", str(mlp_path))
    assert res.returncode == 0 and "2 quantizable weights" in res.stdout


def _expect_error(res, *fragments):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr  # one line, no traceback
    for f in fragments:
        assert f in lines[0], lines[0]


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    before = _listing(tmp_path)
    _expect_error(cli("quantize", str(bad), "-o", str(tmp_path / "o.onnx")), "notes.onnx", "not a readable ONNX")
    assert _listing(tmp_path) == before


def test_truncated(mlp_path, tmp_path):
    data = mlp_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    before = _listing(tmp_path)
    _expect_error(cli("quantize", str(cut), "-o", str(tmp_path / "o.onnx")), "cut.onnx")
    assert _listing(tmp_path) == before


def test_missing_file(tmp_path):
    _expect_error(cli("quantize", str(tmp_path / "nope.onnx")), "nope.onnx", "no such file")


def test_missing_external_data(tmp_path):
    model = mlp(k=256, hidden=128, n=64)
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    _expect_error(cli("quantize", str(path), "-o", str(tmp_path / "o.onnx")), "ext.onnx.data", "missing")
    assert not (tmp_path / "o.onnx").exists()


def test_truncated_external_data(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(mlp(k=256, hidden=128, n=64), path, save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    _expect_error(cli("quantize", str(path), "-o", str(tmp_path / "o.onnx")), "truncated")


def test_nothing_to_quantize(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    _expect_error(cli("quantize", str(path), "-o", str(tmp_path / "o.onnx")), "nothing to quantize")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("flags,fragment", [
    (["--block-size", "48", "--format", "matmulnbits"], "--block-size"),
    (["--bits", "3", "--format", "qdq"], "--bits"),
    (["--bits", "11"], "--bits"),
    (["--exclude", "("], "--exclude"),
    (["--dim", "batch"], "--dim"),
    (["--op-types", ","], "--op-types"),
])
def test_invalid_flags(mlp_path, tmp_path, flags, fragment):
    out = tmp_path / "o.onnx"
    _expect_error(cli("quantize", str(mlp_path), "-o", str(out), *flags), fragment)
    assert not out.exists()


def test_refuses_to_overwrite_input(mlp_path):
    before = mlp_path.read_bytes()
    _expect_error(cli("quantize", str(mlp_path), "-o", str(mlp_path)), "refusing to overwrite")
    assert mlp_path.read_bytes() == before


def test_input_untouched_and_no_temp_debris(mlp_path, tmp_path):
    before = mlp_path.read_bytes()
    res = cli("quantize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--no-eval")
    assert res.returncode == 0, res.stderr
    assert mlp_path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxfgq-")]


def test_eval_command(mlp_path, tmp_path):
    out = tmp_path / "o.onnx"
    assert cli("quantize", str(mlp_path), "-o", str(out), "--no-eval").returncode == 0
    res = cli("eval", str(mlp_path), str(out), "--eval-samples", "16", "--dim", "batch=4")
    assert res.returncode == 0, res.stderr
    assert "cosine_mean" in res.stdout
