"""External data stays inside the model's folder and is never looked up relative to the working directory.

Hostile locations are refused before anything is read, with one line naming the initializer and
nothing about the file pointed to; legitimate external-data models quantize from any working
directory (a decoy ``model.onnx.data`` in cwd must not be picked up) in every mode.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import cli, cosine, mlp, run

OUTSIDE_SIZE = 12345  # the size of the file outside the folder: no message may reveal it


def _external(name: str, shape, location: str, offset: int = 0, length: int | None = None) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", str(offset))]
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        e = t.external_data.add()
        e.key, e.value = key, value
    return t


def _one_matmul(folder: Path, location: str, *, offset: int = 0, length: int | None = None,
                as_constant: bool = False) -> Path:
    """x[1,64] @ w[64,64] (16384 bytes) with w's external data at ``location``."""
    folder.mkdir(parents=True, exist_ok=True)
    w = _external("w", (64, 64), location, offset, length)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [w]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w, name="const_w"))
        inits = []
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A secret file outside the model folder."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.random.default_rng(0).standard_normal(OUTSIDE_SIZE // 4 + 1).astype(np.float32)
                       .tobytes()[:OUTSIDE_SIZE])
    return secret


def _refused(tmp_path: Path, model: Path, *flags: str, fragments=("outside the model folder",)) -> str:
    before = sorted(p.name for p in model.parent.iterdir())
    out = model.parent / "q.onnx"
    r = cli("quantize", str(model), "-o", str(out), *flags, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'w'" in lines[0], lines[0]  # names the initializer
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not re.search(rf"\b{OUTSIDE_SIZE}\b", r.stderr)  # the location is echoed; the file is not described
    assert sorted(p.name for p in model.parent.iterdir()) == before  # no output, no temp folder
    return lines[0]


FORMATS = [(), ("--format", "qdq")]


@pytest.mark.parametrize("flags", FORMATS, ids=["matmulnbits", "qdq"])
def test_absolute_location_refused(tmp_path, outside, flags):
    _refused(tmp_path, _one_matmul(tmp_path / "m", str(outside)), *flags)


@pytest.mark.parametrize("flags", FORMATS, ids=["matmulnbits", "qdq"])
def test_dotdot_location_refused(tmp_path, outside, flags):
    _refused(tmp_path, _one_matmul(tmp_path / "m" / "sub", "../../secret.bin"), *flags)


def test_dotdot_location_of_a_missing_file_says_nothing_about_it(tmp_path):
    line = _refused(tmp_path, _one_matmul(tmp_path / "m", "../../../../etc/nothing-here"))
    assert "missing" not in line and "no such" not in line


@pytest.mark.parametrize("flags", FORMATS, ids=["matmulnbits", "qdq"])
def test_symlink_escape_refused(tmp_path, outside, flags):
    model = _one_matmul(tmp_path / "m", "model.onnx.data")
    (model.parent / "model.onnx.data").symlink_to(outside)
    _refused(tmp_path, model, *flags)


def test_symlinked_folder_escape_refused(tmp_path, outside):
    model = _one_matmul(tmp_path / "m", "weights/secret.bin")
    (model.parent / "weights").symlink_to(tmp_path)
    _refused(tmp_path, model)


def test_symlink_then_dotdot_escape_refused(tmp_path, outside):
    # 'link/../secret.bin' is inside the folder on paper, but the OS follows 'link' first.
    model = _one_matmul(tmp_path / "m", "link/../secret.bin")
    deep = tmp_path / "deep" / "er"
    deep.mkdir(parents=True)
    (tmp_path / "secret.bin").rename(tmp_path / "deep" / "secret.bin")
    (model.parent / "link").symlink_to(deep)
    _refused(tmp_path, model)


def test_dotdot_through_a_missing_folder_is_a_clean_error(tmp_path):
    model = _one_matmul(tmp_path / "m", "sub/../model.onnx.data")
    (model.parent / "model.onnx.data").write_bytes(np.ones(64 * 64, np.float32).tobytes())
    r = cli("quantize", str(model), "-o", str(model.parent / "q.onnx"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "missing" in r.stderr


def test_constant_attribute_location_refused(tmp_path, outside):
    line = _refused(tmp_path, _one_matmul(tmp_path / "m", str(outside), as_constant=True), "--format", "qdq")
    assert "const_w" in line


@pytest.mark.parametrize("flags", FORMATS, ids=["matmulnbits", "qdq"])
def test_length_mismatch_refused(tmp_path, flags):
    model = _one_matmul(tmp_path / "m", "model.onnx.data", length=100)
    (model.parent / "model.onnx.data").write_bytes(np.ones(64 * 64, np.float32).tobytes())
    _refused(tmp_path, model, *flags, fragments=("length 100 does not match", "16384"))


@pytest.mark.parametrize("flags", FORMATS, ids=["matmulnbits", "qdq"])
def test_offset_beyond_file_refused(tmp_path, flags):
    model = _one_matmul(tmp_path / "m", "model.onnx.data", offset=4096, length=16384)
    (model.parent / "model.onnx.data").write_bytes(np.ones(64 * 64, np.float32).tobytes())
    _refused(tmp_path, model, *flags, fragments=("truncated",))


def test_location_inside_a_subfolder_and_offset_are_honoured(tmp_path):
    """A legitimate layout: data in a subfolder at an offset; the quantized output tracks the right bytes."""
    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32) / 8
    model = _one_matmul(tmp_path / "m", "data/../data/w.bin", offset=64, length=w.nbytes)
    (model.parent / "data").mkdir()
    (model.parent / "data" / "w.bin").write_bytes(b"\xff" * 64 + w.tobytes() + b"\xff" * 64)
    out = tmp_path / "q.onnx"
    r = cli("quantize", str(model), "-o", str(out), "--block-size", "32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(4).standard_normal((4, 64)).astype(np.float32)
    assert cosine(run(out, {"x": x})[0], x @ w) > 0.99


# --- the working-directory decoy ------------------------------------------------------------------

@pytest.fixture(scope="module")
def decoy_setup(tmp_path_factory) -> tuple[Path, Path]:
    """The model to quantize in ``model/``, and a working directory holding ANOTHER model's
    ``model.onnx.data`` (same names, same shapes, different weights)."""
    root = tmp_path_factory.mktemp("decoy")
    for name, seed in (("model", 0), ("cwd", 7)):
        (root / name).mkdir()
        onnx.save(mlp(k=256, hidden=128, n=64, seed=seed), root / name / "model.onnx",
                  save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return root / "model" / "model.onnx", root / "cwd"


MODES = {
    "rtn": (),
    "rtn-qdq": ("--format", "qdq"),
    "gptq": ("--algo", "gptq", "--calibration", "random", "--calib-samples", "256"),
    "gptq-qdq": ("--format", "qdq", "--algo", "gptq", "--calibration", "random", "--calib-samples", "256"),
    "awq": ("--algo", "awq", "--calibration", "random", "--calib-samples", "256"),
    "static-uint8": ("--activations", "uint8", "--calibration", "random"),
}


@pytest.mark.parametrize("mode", MODES)
def test_cwd_decoy_is_never_read(decoy_setup, tmp_path, mode):
    model, cwd = decoy_setup
    out = tmp_path / "q.onnx"
    r = cli("quantize", str(model), "-o", str(out), "--block-size", "32", *MODES[mode], cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Shape inference failed" not in r.stderr, r.stderr
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    ref = run(model, {"x": x})[0]  # onnxruntime reads the input's own data, beside it
    decoy = run(cwd / "model.onnx", {"x": x})[0]
    assert cosine(ref, decoy) < 0.5  # the decoy really is a different model
    assert cosine(run(out, {"x": x})[0], ref) > 0.99


def test_api_ir_model_keeps_its_folder_after_chdir(decoy_setup, monkeypatch):
    """An ir.Model loaded from a relative path, quantized after the working directory changed."""
    from onnxfgq.api import load_model

    model, cwd = decoy_setup
    monkeypatch.chdir(model.parent)
    loaded = ir.load("model.onnx")  # onnx_ir: base_dir "" (the cwd of now)
    copy = load_model(loaded)
    monkeypatch.chdir(cwd)
    w1 = next(v for v in copy.graph.initializers.values() if v.name == "w1").const_value.numpy()
    assert np.array_equal(w1, numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0]))
    assert all(isinstance(v.const_value, ir.ExternalTensor) and v.const_value.base_dir == ""
               for v in loaded.graph.initializers.values())  # the caller's model is left as it was


def test_api_model_proto_with_external_references_is_refused(decoy_setup):
    import onnxfgq
    from onnxfgq.errors import ModelLoadError

    model, _ = decoy_setup
    proto = onnx.load(str(model), load_external_data=False)
    with pytest.raises(ModelLoadError, match="external data"):
        onnxfgq.quantize(proto)


def test_rebuild_and_session_read_the_models_own_files(decoy_setup, monkeypatch):
    """The one mechanism: a proto round trip and an onnxruntime session from another cwd."""
    from onnxfgq.graph import external, io

    model, cwd = decoy_setup
    loaded = io.load(model)
    monkeypatch.chdir(cwd)
    rebuilt = external.rebuild(loaded)
    assert external.folders(rebuilt) == {str(model.parent)}
    x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    np.testing.assert_allclose(external.session(rebuilt).run(None, {"x": x})[0], ref, rtol=1e-5, atol=1e-5)


def test_tensors_inside_subgraphs_and_functions_are_checked(tmp_path, outside):
    """An If branch initializer and a model-local function's Constant, both pointing outside."""
    from onnxfgq.errors import ModelLoadError
    from onnxfgq.graph import io

    bad = _external("w", (64, 64), str(outside))
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], [bad])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "m" / "if.onnx"
    path.parent.mkdir()
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    with pytest.raises(ModelLoadError, match="initializer 'w'.*outside the model folder"):
        io.load(path)

    fn = helper.make_function("local", "f", ["a"], ["b"],
                              [helper.make_node("Constant", [], ["k"], value=bad, name="fconst"),
                               helper.make_node("MatMul", ["a", "k"], ["b"])],
                              [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("f", ["x"], ["y"], domain="local")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    path = tmp_path / "m" / "fn.onnx"
    path.write_bytes(helper.make_model(graph, functions=[fn], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]).SerializeToString())
    with pytest.raises(ModelLoadError, match="fconst.*outside the model folder"):
        io.load(path)
    assert os.path.getsize(outside) == OUTSIDE_SIZE


def test_single_file_output_holds_the_weights_left_in_float(decoy_setup, tmp_path):
    """--external-data never with a weight left float: it is read from the input's data file into the
    output (a reference would point at a data file beside the output that does not exist)."""
    model, cwd = decoy_setup
    out = tmp_path / "q.onnx"
    r = cli("quantize", str(model), "-o", str(out), "--external-data", "never", "--exclude", "fc1", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    proto = onnx.load(str(out), load_external_data=False)
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)
    x = np.random.default_rng(5).standard_normal((4, 256)).astype(np.float32)
    assert cosine(run(out, {"x": x})[0], run(model, {"x": x})[0]) > 0.99


@pytest.mark.parametrize("location, message", [
    ("", "is not a file name"),
    ("C:\\weights\\w.bin", "outside the model folder"),
    ("C:/weights/w.bin", "outside the model folder"),
    ("\\\\server\\share\\w.bin", "outside the model folder"),
    ("sub/../../w.bin", "outside the model folder"),
    (".", "outside the model folder"),
    ("sub/..", "outside the model folder"),
    ("missing.bin", "is missing"),  # inside the folder: saying so reveals nothing
])
def test_location_edge_cases(tmp_path, location, message):
    from onnxfgq.errors import ModelLoadError
    from onnxfgq.graph import io

    model = _one_matmul(tmp_path / "m", location)
    with pytest.raises(ModelLoadError, match=message):
        io.load(model)
