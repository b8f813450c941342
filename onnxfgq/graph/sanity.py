"""Graph checks and normalisations run before any weight is read.

``check`` refuses, with one line naming the node or tensor, what onnxruntime would refuse or what
would crash later: a cycle, a tensor whose stored data is shorter than its dims (or absent), a
declared size far beyond what the file holds (a [2^20, 2^20] weight without data must not become a
4 TiB allocation). ``normalize`` fixes what is valid but trips the rewrite: IR-3 models that list
their initializers as graph inputs (new initializers would have to be inputs too), and node names
that repeat (an emitted ``<name>_MatMulNBits`` would repeat as well, which onnxruntime refuses).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import onnx_ir as ir

from onnxfgq.errors import ModelLoadError

_FOUR_BIT = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.FLOAT4E2M1}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its control-flow bodies, and every model-local function's graph (with bodies)."""
    yield model.graph
    yield from model.graph.subgraphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.graph.subgraphs()


def tensors(model: ir.Model) -> Iterator[tuple[str, ir.TensorProtocol]]:
    """(label, tensor) of every initializer and tensor attribute of ``model``."""
    for graph in graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield f"initializer {value.name!r}", value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield f"the {attr.name!r} tensor of node {node.name!r}", attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for t in attr.value or ():
                        yield f"a tensor in attribute {attr.name!r} of node {node.name!r}", t


def _stored_entries(tensor: ir.TensorProtocol) -> tuple[int, int, str] | None:
    """(entries needed, entries stored, unit) of a tensor still held as a TensorProto; None if not checkable."""
    proto = getattr(tensor, "raw", None)
    if not hasattr(proto, "raw_data") or not hasattr(proto, "dims"):
        return None
    if tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    numel = math.prod(int(d) for d in proto.dims)
    if proto.HasField("raw_data"):
        return math.ceil(tensor.dtype.bitwidth * numel / 8), len(proto.raw_data), "bytes"
    stored = max(len(getattr(proto, f)) for f in _TYPED_FIELDS)
    per = 2 if tensor.dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1
    need = math.ceil(numel / 2) if tensor.dtype in _FOUR_BIT else numel * per
    return need, stored, "values"


def check(model: ir.Model) -> None:
    """Raise ModelLoadError (one line) for a cycle or a tensor whose data does not match its dims."""
    for label, tensor in tensors(model):
        sizes = _stored_entries(tensor)
        if sizes is None:
            continue
        need, stored, unit = sizes
        if stored == need:
            continue
        dims = "x".join(str(d) for d in tensor.shape.dims) or "scalar"
        what = "has no data" if stored == 0 else f"has {stored} {unit} of data where its dims need {need}"
        raise ModelLoadError(f"{label} ({tensor.dtype.name}, {dims}) {what}")
    for graph in graphs(model):
        node = _cycle_node(graph)
        if node is not None:
            where = "" if graph is model.graph else f" (in the body or function {graph.name!r})"
            raise ModelLoadError(f"the graph has a cycle through node {node.name or node.op_type!r}{where}: "
                                 "an ONNX graph must be acyclic")


def _cycle_node(graph: ir.Graph) -> ir.Node | None:
    """A node on (or after) a cycle of ``graph``, or None when it is acyclic (Kahn's algorithm)."""
    nodes = list(graph)
    index = {id(n): i for i, n in enumerate(nodes)}
    pending = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for v in node.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in index:
                pending[i] += 1
                users[index[id(p)]].append(i)
    ready = [i for i, c in enumerate(pending) if c == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in users[i]:
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if done == len(nodes):
        return None
    return next(nodes[i] for i, c in enumerate(pending) if c > 0)


def normalize(model: ir.Model) -> list[str]:
    """Make ``model`` safe to rewrite (see the module docstring); returns notes for the report."""
    notes = []
    if model.ir_version < 4:
        listed = [v for v in model.graph.inputs if v.is_initializer()]
        for v in listed:
            model.graph.inputs.remove(v)
        model.ir_version = 4
        if listed:
            notes.append(f"IR version 3: {len(listed)} initializers listed as graph inputs are now plain "
                         "initializers (IR 4)")
    renamed = unique_node_names(model)
    if renamed:
        notes.append(f"renamed {renamed} nodes whose names repeated")
    return notes


def unique_node_names(model: ir.Model) -> int:
    """Give every repeated node name (over the main graph and its bodies) a numeric suffix; returns
    how many nodes were renamed. Run again after emitting: emitted names derive from node names."""
    seen: set[str] = set()
    renamed = 0
    nodes = [n for g in (model.graph, *model.graph.subgraphs()) for n in g]
    taken = {n.name for n in nodes}
    for node in nodes:
        if not node.name or node.name not in seen:
            seen.add(node.name)
            continue
        i = 1
        while f"{node.name}_{i}" in taken:
            i += 1
        node.name = f"{node.name}_{i}"
        taken.add(node.name)
        seen.add(node.name)
        renamed += 1
    return renamed


def keep_io_shapes(before: ir.Graph, after: ir.Graph) -> None:
    """Put back graph input/output shapes that a rebuild dropped. onnx's version converter drops a
    declared shape it cannot re-infer (PP-OCRv5 rec declares its output as ``[]``), and onnx.checker
    then refuses the graph for the missing field; the input declared it, so the output keeps it."""
    for old, new in zip((*before.inputs, *before.outputs), (*after.inputs, *after.outputs)):
        if new.shape is None and old.shape is not None and old.name == new.name:
            new.shape = ir.Shape(old.shape)
