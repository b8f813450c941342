"""engine/checkpoint.py: an ``--engine blocks`` run killed after a block and resumed writes the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from onnxfgq.api import quantize_file
from onnxfgq.config import Algorithm, ConfigError, QuantizeConfig, WeightConfig
from tests.helpers import ROOT, cli

FLAGS = ["--algo", "gptq", "--block-size", "32", "--calibration", "random", "--calib-samples", "8",
         "--calib-batch-size", "4", "--engine", "blocks", "--no-eval"]


def _config(**kw) -> QuantizeConfig:
    wc = dict(algorithm=Algorithm.GPTQ, block_size=32, calibration="random", calibration_samples=8,
              calibration_batch_size=4, engine="blocks")
    return QuantizeConfig(weights=WeightConfig(**{**wc, **kw}))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """tools/make_large_llama.py at toy size: 2 layers, cut into 5 blocks."""
    sys.path.insert(0, str(ROOT / "tools"))
    from make_large_llama import build

    return build(tmp_path_factory.mktemp("resume") / "llama", layers=2, hidden=64, ffn=160, vocab=300, heads=4)


def _killed_at(model: Path, out: Path, point: str, sig: int, flags: list[str] = FLAGS) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ONNXFGQ_TEST_PAUSE_AT": point}
    proc = subprocess.Popen([sys.executable, "-m", "onnxfgq.cli", "quantize", str(model), "-o", str(out), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # log lines may come first; the pause point says when to strike
        seen.append(line)
        if f"paused at {point}" in line:
            break
    assert any(f"paused at {point}" in s for s in seen), "".join(seen)
    proc.send_signal(sig)
    out_text, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_text, "".join(seen) + err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGKILL, marks=pytest.mark.slow)],
                         ids=["TERM", "KILL"])
def test_killed_run_resumes_to_the_same_bytes(llama, tmp_path, sig):
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    reference = tmp_path / "ref" / "q.onnx"  # the same name: the model names its external data file
    quantize_file(llama, reference, _config())
    assert sorted(p.name for p in reference.parent.iterdir()) == ["q.onnx", "q.onnx.data"]  # work folder gone

    out = tmp_path / "run" / "q.onnx"
    work = tmp_path / "run" / "q.onnx.onnxfgq-work"
    r = _killed_at(llama, out, "block2", sig)  # after the third of five blocks was checkpointed
    assert r.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), r.stderr
    assert not out.exists()
    manifest = json.loads((work / "manifest.json").read_text())
    assert manifest["finished"] == 2 and manifest["blocks"] == 5
    if sig == signal.SIGTERM:
        assert "Traceback" not in r.stderr
        assert f"the work folder {work} keeps 3 of 5 blocks" in r.stderr, r.stderr

    again = cli("quantize", llama, "-o", out, *FLAGS)  # without --resume: refused, folder named
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"onnxfgq: error: --resume: the work folder {work} of an interrupted run exists: add --resume to "
        f"continue it, or delete it to start over"]

    done = cli("quantize", llama, "-o", out, *FLAGS, "--resume")
    assert done.returncode == 0, done.stderr
    assert "--resume: 3 of 5 blocks read back" in done.stdout
    # stderr is a pipe here: plain progress lines, one per step of each block this run worked on
    steps = [line for line in done.stderr.splitlines() if line.startswith("onnxfgq: block ") and " done in " in line]
    assert [line.split(":")[1].split(" (")[0].strip() for line in steps] == [
        "block 4/5 statistics", "block 4/5 solve 3 weights", "block 5/5 statistics", "block 5/5 solve 1 weight"]
    assert "about" in steps[-1] and "left" in steps[-1], steps  # an estimate once a block is done
    for name in ("q.onnx", "q.onnx.data"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name
    leftovers = sorted(p.name for p in out.parent.iterdir())
    if sig == signal.SIGTERM:
        assert leftovers == ["q.onnx", "q.onnx.data"]  # work folder removed, no staging folder left
    else:  # SIGKILL runs no cleanup: only the killed run's hidden staging folder stays behind
        assert [p for p in leftovers if not p.startswith(".onnxfgq-")] == ["q.onnx", "q.onnx.data"]


def test_awq_sequential_run_resumes_to_the_same_bytes(llama, tmp_path):
    """AWQ block by block edits the output graph: a resumed run redoes the finished blocks' edits from
    the work folder (their scales), and later blocks read the quantized blocks' outputs (--sequential)."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "run").mkdir()
    reference = tmp_path / "ref" / "q.onnx"
    report = quantize_file(llama, reference, _config(algorithm=Algorithm("awq+gptq"), gptq_sequential=True))
    assert sum("awq alpha" in (la.detail or "") for la in report.layers) >= 4
    flags = [*FLAGS, "--algo", "awq+gptq", "--sequential"]
    out = tmp_path / "run" / "q.onnx"
    r = _killed_at(llama, out, "block2", signal.SIGTERM, flags)
    assert r.returncode == 143, r.stderr
    done = cli("quantize", llama, "-o", out, *flags, "--resume")
    assert done.returncode == 0, done.stderr
    assert "--resume: 3 of 5 blocks read back" in done.stdout
    for name in ("q.onnx", "q.onnx.data"):
        assert (out.parent / name).read_bytes() == (reference.parent / name).read_bytes(), name


def test_resume_refuses_other_settings_other_input_and_no_folder(llama, tmp_path, monkeypatch):
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match="no work folder"):
        quantize_file(llama, out, _config(), resume=True)
    work = tmp_path / "q.onnx.onnxfgq-work"
    import onnxfgq.graph.io as gio

    def interrupt(name: str) -> None:  # as SIGINT would, right after block 0 is checkpointed
        if name == "block0":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(gio, "pause_point", interrupt)
        with pytest.raises(KeyboardInterrupt):
            quantize_file(llama, out, _config())
    assert json.loads((work / "manifest.json").read_text())["finished"] == 0
    with pytest.raises(ConfigError, match=r"other settings \(weights.block_size differ\)"):
        quantize_file(llama, out, _config(block_size=16), resume=True)
    with pytest.raises(ConfigError, match="--resume: only a calibrated --engine blocks run"):
        quantize_file(llama, out, _config(engine="whole"), resume=True)
    st = llama.stat()
    os.utime(llama, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same path, another file as far as we can tell
    try:
        with pytest.raises(ConfigError, match="another input model"):
            quantize_file(llama, out, _config(), resume=True)
    finally:
        os.utime(llama, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert work.exists() and not out.exists()  # refusals touch nothing
    quantize_file(llama, out, _config(executor="threads"), resume=True)  # the executor is not a setting
    assert out.exists() and not work.exists()
