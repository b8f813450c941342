"""Nothing half-done is ever left behind: output and report paths are checked before the work, the
output is moved into place only after the accuracy report, and SIGINT/SIGTERM at any point leave the
output folder as it was (no output, no hidden temporary folder), with one line and exit 130/143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import cli, mlp


@pytest.fixture()
def work(tmp_path) -> Path:
    """A folder holding only the input model (external data, so a save writes two files)."""
    onnx.save(mlp(k=256, hidden=128, n=64), tmp_path / "m.onnx", save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    return tmp_path


INPUT = ["m.onnx", "m.onnx.data"]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize("flags, fragments", [
    (("-o", "."), ("-o", "is a folder")),
    (("-o", "q.onnx", "--report", "missing/r.json"), ("--report", "does not exist")),
    (("-o", "q.onnx", "--report", "."), ("--report", "is a folder")),
    (("-o", "missing/q.onnx"), ("does not exist",)),
    (("-o", "q.onnx", "--batch-size", "0"), ("--batch-size",)),
    (("-o", "q.onnx", "--batch-size", "-3"), ("--batch-size",)),
    (("-o", "q.onnx", "--eval-samples", "0"), ("--eval-samples",)),
    (("-o", "q.onnx", "--algo", "gptq", "--calibration", "random", "--calib-samples", "0"), ("--calib-samples",)),
])
def test_bad_paths_and_flags_refused_before_work(work, flags, fragments):
    _one_line_error(cli("quantize", "m.onnx", *flags, cwd=work), *fragments)
    assert _listing(work) == INPUT


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_folder_refused(work):
    locked = work / "locked"
    locked.mkdir(mode=0o500)
    try:
        _one_line_error(cli("quantize", "m.onnx", "-o", "locked/q.onnx", cwd=work), "not writable")
    finally:
        locked.chmod(0o700)


def test_calibrate_output_into_missing_folder(work):
    _one_line_error(cli("calibrate", "m.onnx", "--data", "random", "-o", "missing/r.json", cwd=work),
                    "-o", "does not exist")
    assert _listing(work) == INPUT


def test_failed_accuracy_report_leaves_nothing(work):
    """The feeds do not fit the model: onnxruntime refuses them in the report, after all the work."""
    bad = work / "evalset"
    bad.mkdir()
    np.savez(bad / "0.npz", x=np.ones((2, 7), np.float32))
    r = cli("quantize", "m.onnx", "-o", "q.onnx", "--report", "r.json", "--eval-data", "evalset", cwd=work)
    _one_line_error(r, "accuracy report failed", "nothing was written")
    assert _listing(work) == sorted([*INPUT, "evalset"])


def test_eval_of_models_with_different_inputs_is_one_line(work):
    onnx.save(mlp(k=64, hidden=32, n=16), work / "other.onnx")
    _one_line_error(cli("eval", "m.onnx", "other.onnx", cwd=work), "onnxruntime")


def test_success_writes_output_and_report_together(work):
    r = cli("quantize", "m.onnx", "-o", "q.onnx", "--report", "r.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert _listing(work) == sorted([*INPUT, "q.onnx", "q.onnx.data", "r.json"])


def _signal_at(work: Path, point: str, sig: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "ONNXFGQ_TEST_PAUSE_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "onnxfgq.cli", "quantize", "m.onnx", "-o", "q.onnx",
                             "--report", "r.json"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    line = proc.stderr.readline()  # blocks until the pause point says so (or the process ends)
    assert f"paused at {point}" in line, line
    assert time.monotonic() < deadline
    if point != "startup":
        assert any(p.name.startswith(".onnxfgq-") for p in work.iterdir())  # the state we interrupt
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("point", ["startup", "save", "commit"])
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_signal_leaves_nothing(work, point, sig, code):
    r = _signal_at(work, point, sig)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing was written" in lines[0], r.stderr
    assert _listing(work) == INPUT
