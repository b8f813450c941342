"""The loader and the first steps after it on hostile files: truncated and mutated protobufs, and
external-data entries pointing anywhere. Whatever the bytes, the answer is a model or a clean
onnxfgq error (OnnxfgqError: one line at the CLI), never another exception."""

from __future__ import annotations

import onnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from onnxfgq.config import Selection
from onnxfgq.errors import OnnxfgqError
from onnxfgq.graph import io, sanity
from onnxfgq.graph.targets import find_targets
from tests.helpers import mlp

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _small() -> onnx.ModelProto:
    return mlp(k=40, hidden=24, n=8)


SEED = _small().SerializeToString()


def _load_and_read(path) -> None:
    """What every command does first: load, check, find the targets and read their weights."""
    try:
        model = io.load(path)
        sanity.check(model)
        sanity.normalize(model)
        for t in find_targets(model, Selection(min_elements=0)):
            if t.skip_reason is None:
                t.weight()
    except OnnxfgqError:
        pass


@SETTINGS
@given(cut=st.integers(0, len(SEED) - 1))
def test_truncated_protobuf(tmp_path, cut):
    path = tmp_path / "m.onnx"
    path.write_bytes(SEED[:cut])
    _load_and_read(path)


@SETTINGS
@given(edits=st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_protobuf(tmp_path, edits):
    data = bytearray(SEED)
    for pos, byte in edits:
        data[pos] = byte
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(data))
    _load_and_read(path)


@SETTINGS
@given(dims=st.lists(st.integers(-3, 2 ** 40), min_size=0, max_size=3),
       raw=st.binary(max_size=64), dtype=st.sampled_from([1, 2, 3, 6, 7, 10, 16, 21, 22]))
def test_initializer_with_any_dims_and_data(tmp_path, dims, raw, dtype):
    m = _small()
    t = m.graph.initializer[0]
    t.ClearField("dims")
    t.dims.extend(dims)
    t.data_type = dtype
    t.raw_data = raw
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    _load_and_read(path)


LOCATIONS = st.one_of(
    st.sampled_from(["/etc/passwd", "../../etc/passwd", "..", ".", "", "m.onnx", "data.bin", "sub/../data.bin",
                     "link.bin", "./data.bin", "data.bin\x00x", "C:\\\\x.bin", "~/x.bin"]),
    st.text(max_size=20),
)


@SETTINGS
@given(location=LOCATIONS, offset=st.one_of(st.none(), st.integers(-5, 2 ** 63)),
       length=st.one_of(st.none(), st.integers(-5, 2 ** 63)))
def test_hostile_external_data_entries(tmp_path, location, offset, length):
    (tmp_path / "data.bin").write_bytes(bytes(40 * 24 * 4 + 64))
    if not (tmp_path / "link.bin").exists():
        (tmp_path / "link.bin").symlink_to("/etc/hostname")
    m = _small()
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    path = tmp_path / "m.onnx"
    try:
        path.write_bytes(m.SerializeToString())
    except ValueError:  # protobuf refuses some strings (invalid UTF-8): nothing to load
        assume(False)
    _load_and_read(path)
