"""Guarantees of docs/GUARANTEES.md not held elsewhere: identical output bytes on repeated runs, and
the input (model and external data) byte-for-byte unchanged, run as a user from another folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest

from tests.helpers import cli, mlp


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def external_model(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(mlp(k=256, hidden=128, n=64), path, save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    return path


@pytest.mark.parametrize("flags", [
    (),
    ("--format", "qdq", "--block-size", "32"),
    ("--algo", "gptq", "--calibration", "random", "--calib-samples", "16", "--dim", "batch=2"),
], ids=["rtn-matmulnbits", "rtn-qdq", "gptq"])
def test_repeated_runs_write_identical_bytes_and_leave_the_input_alone(external_model, tmp_path, flags):
    before = _digest(external_model.parent)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        r = cli("quantize", str(external_model), "-o", str(out / "q.onnx"), "--external-data", "always",
                "--no-eval", *flags, cwd=elsewhere)
        assert r.returncode == 0, r.stderr
        outs.append(_digest(out))
    assert outs[0] == outs[1] and set(outs[0]) == {"q.onnx", "q.onnx.data"}
    assert _digest(external_model.parent) == before
    assert not list(elsewhere.iterdir())  # nothing written into the working directory
