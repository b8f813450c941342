"""External data, contained: the one mechanism every path that loads, rebuilds or runs a model uses.

At load, every external tensor (initializers and tensor attributes, in the main graph, control-flow
bodies and model-local functions) is checked before anything is read: its ``location`` must resolve
inside the model's own folder (no absolute path, no escaping ``..``, no symlink whose real path leaves
the real folder), its ``length`` must equal what its dims and dtype need, and ``offset`` + that length
must fit in the file. Each tensor is then bound to the absolute folder, so nothing is ever looked up
relative to the working directory, whatever the process's cwd is later.

Proto round trips (``ir.to_proto`` / ``ir.from_proto``) lose that binding: ``rebuild`` re-binds the
result, and ``session`` hands onnxruntime the small graph proto plus the model folder, so sessions read
the original files (no copy of the weights, nothing relative to cwd).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxfgq.errors import ModelLoadError

# protobuf cannot serialise a message of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 2**26
# onnxruntime resolves the external data of a model given as bytes against this folder.
ORT_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


@dataclass
class Slot:
    """One place in a model that holds a tensor, with a way to put another tensor there."""

    label: str  # "initializer 'w'" or "tensor 'w' in attribute 'value' of node 'c'"
    tensor: ir.TensorProtocol
    put: Callable[[ir.TensorProtocol], None]


def _graphs(model: ir.Model) -> Iterator[ir.Graph]:
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.subgraphs()


def slots(model: ir.Model) -> Iterator[Slot]:
    """Every tensor held by ``model``: initializers and tensor attributes, in every graph and function."""
    for graph in _graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield Slot(f"initializer {value.name!r}", value.const_value,
                           lambda t, v=value: setattr(v, "const_value", t))
        for node in graph:
            for attr in list(node.attributes.values()):
                if attr.is_ref():
                    continue
                where = f"attribute {attr.name!r} of node {node.name!r}"
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    if attr.value.name:
                        where = f"tensor {attr.value.name!r} in {where}"
                    yield Slot(where, attr.value,
                               lambda t, n=node, a=attr.name: n.attributes.__setitem__(a, ir.AttrTensor(a, t)))
                elif attr.type == ir.AttributeType.TENSORS and attr.value:
                    for i, tensor in enumerate(attr.value):
                        def put(t, n=node, a=attr.name, i=i):
                            items = list(n.attributes[a].value)
                            items[i] = t
                            n.attributes[a] = ir.AttrTensors(a, items)
                        yield Slot(f"{where} (item {i})", tensor, put)


def external_slots(model: ir.Model) -> Iterator[Slot]:
    return (s for s in slots(model) if isinstance(s.tensor, ir.ExternalTensor))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_tensor(label: str, tensor: ir.ExternalTensor, folder: str) -> None:
    """Raise ModelLoadError unless ``tensor`` lies, whole, in a file inside ``folder``.

    Nothing is said about a file outside the folder (not whether it exists, nor its size)."""
    loc = os.fspath(tensor.location)
    if not loc or "\0" in loc:
        raise ModelLoadError(f"{label}: its external data location {loc!r} is not a file name")
    outside = ModelLoadError(f"{label}: its external data location {loc!r} is outside the model folder")
    drive = len(loc) > 2 and loc[0].isalpha() and loc[1] == ":" and loc[2] in "\\/"  # C:\..., C:/...
    if os.path.isabs(loc) or loc.startswith(("\\", "/")) or drive:
        raise outside
    folder_abs = os.path.normpath(os.path.abspath(folder))
    path = os.path.normpath(os.path.join(folder_abs, loc))
    if not _inside(path, folder_abs) or path == folder_abs:
        raise outside
    # The OS resolves the location as written, component by component (``sub/..`` follows ``sub``
    # when it is a symlink), so the physical path is what must stay inside the folder.
    path = os.path.join(folder_abs, loc)
    real_folder = os.path.realpath(folder_abs)
    real = os.path.realpath(path)
    if not _inside(real, real_folder) or real == real_folder:
        raise outside  # a symlink (the file or a folder on the way) that leaves the model folder
    offset, length, need = tensor.offset or 0, tensor.length, tensor.nbytes
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{label}: negative external data offset or length")
    if length is not None and length != need:
        raise ModelLoadError(f"{label}: its external data length {length} does not match its dims "
                             f"{list(tensor.shape)} of {tensor.dtype.name} ({need} bytes)")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{label}: external data file {loc!r} is missing (looked in {folder_abs})")
    st = os.stat(path)
    if st.st_nlink > 1:  # onnx_ir refuses to read these (a hard link can smuggle in any file)
        raise ModelLoadError(f"{label}: external data file {loc!r} has {st.st_nlink} hard links; "
                             f"onnxfgq reads only files with one (copy it)")
    if offset + need > st.st_size:
        raise ModelLoadError(f"{label}: external data file {loc!r} is truncated: the tensor needs bytes "
                             f"{offset} to {offset + need}")


def bind(model: ir.Model, folder: str | os.PathLike | None = None) -> None:
    """Check every external tensor of ``model`` and bind it to an absolute folder.

    ``folder`` is the model file's folder; None keeps each tensor's own ``base_dir`` (onnx_ir's
    meaning: the working directory when empty), made absolute now so it no longer depends on cwd.
    Tensors are replaced, not edited, so tensors shared with another model are left as they were."""
    for slot in list(external_slots(model)):
        t = slot.tensor
        base = os.path.abspath(os.fspath(folder if folder is not None else (t.base_dir or os.getcwd())))
        check_tensor(slot.label, t, base)
        if os.fspath(t.base_dir) != base:
            slot.put(_external(t, base))


def _external(t: ir.ExternalTensor, base: str) -> ir.ExternalTensor:
    return ir.ExternalTensor(t.location, offset=t.offset, length=t.length, dtype=t.dtype, shape=t.shape,
                             name=t.name, doc_string=t.doc_string, metadata_props=t.metadata_props,
                             base_dir=base)


def folders(model: ir.Model) -> set[str]:
    """The folders the model's external tensors are bound to."""
    return {os.fspath(s.tensor.base_dir) for s in external_slots(model)}


def files(model: ir.Model) -> list[Path]:
    """The external data files ``model`` reads (resolved)."""
    return sorted({Path(s.tensor.path).resolve() for s in external_slots(model)})


def rebuild(model: ir.Model, fn: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None) -> ir.Model:
    """``ir.from_proto(fn(ir.to_proto(model)))`` with every external tensor bound as in ``model``.

    A proto keeps only each external tensor's relative location; the folder comes back from ``model``.
    ``fn`` (an onnx-level tool) must not add external references of its own."""
    bases: dict[str, set[str]] = {}
    for s in external_slots(model):
        bases.setdefault(os.fspath(s.tensor.location), set()).add(os.fspath(s.tensor.base_dir))
    proto = ir.to_proto(model)
    out = ir.from_proto(fn(proto) if fn is not None else proto)
    for slot in list(external_slots(out)):
        found = bases.get(os.fspath(slot.tensor.location), set())
        if len(found) != 1:
            raise ModelLoadError(f"{slot.label}: cannot tell which folder its external data "
                                 f"{os.fspath(slot.tensor.location)!r} belongs to")
        base = next(iter(found))
        check_tensor(slot.label, slot.tensor, base)
        slot.put(_external(slot.tensor, base))
    return out


def inlined(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every external tensor read into memory (for tools that want bytes)."""
    copy = model.clone()
    for slot in list(external_slots(copy)):
        slot.put(ir.Tensor(slot.tensor.numpy(), name=slot.tensor.name))
    return copy


def _inline_bytes(model: ir.Model) -> int:
    return sum(s.tensor.nbytes for s in slots(model) if not isinstance(s.tensor, ir.ExternalTensor))


def session(model: ir.Model, options=None, providers=("CPUExecutionProvider",)):
    """An onnxruntime session over ``model`` that reads external data from the original files.

    The graph proto (external tensors as references) goes to onnxruntime as bytes together with the
    model folder. Only when that cannot work (tensors bound to several folders, or more in-memory
    weights than a proto holds) is the model saved to a temporary folder first."""
    import onnxruntime as ort

    so = options or ort.SessionOptions()
    bound = folders(model)
    if len(bound) <= 1 and _inline_bytes(model) < PROTOBUF_LIMIT:
        if bound:
            so.add_session_config_entry(ORT_FOLDER_KEY, bound.pop())
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=list(providers))
    with tempfile.TemporaryDirectory(prefix="onnxfgq-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1 << 20)
        return ort.InferenceSession(str(path), so, providers=list(providers))


def session_from_path(path: str | os.PathLike, options=None, providers=("CPUExecutionProvider",)):
    """A session over a model file, its external data checked for containment first."""
    import onnxruntime as ort

    from onnxfgq.graph import io

    io.load(path)  # the checks; cheap, weights stay unread
    return ort.InferenceSession(str(path), options or ort.SessionOptions(), providers=list(providers))
