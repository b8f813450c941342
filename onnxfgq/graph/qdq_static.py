"""Static QDQ: decide which nodes and tensors get QuantizeLinear/DequantizeLinear, then insert them.

Planning is structural:
- *core* nodes (Conv, ConvTranspose, MatMul, Gemm) get their float activation inputs quantized, and
  their constant weight per-channel (plus an int32 bias where the op has one);
- *int8 neighbours* (Add, Mul, Concat, pooling) are quantized, inputs and output, only where every
  input is an activation coming from quantized work and the output goes on into quantized work, so
  ORT can keep the chain in int8 (a residual Add between convolutions) and nothing else pays for it;
- tensors computed from mask-like constants (huge magnitudes, e.g. ``finfo(float32).min`` added to
  attention scores) are never quantized: their range would wipe out every ordinary value.

Insertion takes numbers decided elsewhere (``onnxfgq.static`` through ``onnxfgq.quant``); this module
only lays out initializers and nodes.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.graph.targets import constant_chain

CORE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
NEIGHBOUR_OPS = ("Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
# Ops a value passes through on its way between quantized nodes (ORT drops or fuses QDQ around them).
CHAIN_OPS = ("Relu", "Clip", "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
# Core ops whose output is quantized too: onnxruntime fuses DQ -> Conv -> Q into QLinearConv only with a
# Q on the output (DQ -> MatMul / Gemm already fuse to int8 kernels with a float output).
OUTPUT_OPS = ("Conv",)
# A constant of at least this magnitude is mask-like (BERT-style -10000, or finfo.min).
MASK_MAGNITUDE = 1e4
# Mask-likeness stops at ops whose output range no longer depends on the mask's magnitude.
MASK_STOPS = ("Softmax", "LogSoftmax", "Sigmoid", "Tanh", "Shape", "Size", "Equal", "Less", "Greater", "Not")
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass
class Unit:
    """One node quantized as a whole; the accuracy guard keeps or drops units."""

    node: ir.Node
    inputs: list[str]  # activation tensors quantized for this node
    outputs: list[str] = field(default_factory=list)  # neighbours: their output too
    weight_index: int | None = None  # core: the constant weight input
    weight_axis: int = 0  # its output-channel axis, as the node sees it
    bias_index: int | None = None
    skip_reason: str | None = None

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def tensors(self) -> list[str]:
        return self.inputs + self.outputs

    def weight(self) -> np.ndarray | None:
        if self.weight_index is None:
            return None
        return constant_chain(self.node.inputs[self.weight_index]).array()

    def bias(self) -> np.ndarray | None:
        if self.bias_index is None:
            return None
        return constant_chain(self.node.inputs[self.bias_index]).array()


@dataclass
class Plan:
    units: list[Unit]

    @property
    def active(self) -> list[Unit]:
        return [u for u in self.units if u.skip_reason is None]

    def tensors(self, units: Collection[Unit] | None = None) -> list[str]:
        names: dict[str, None] = {}
        for u in self.active if units is None else units:
            names.update(dict.fromkeys(u.tensors))
        return list(names)


def _is_std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _is_float(v: ir.Value) -> bool:
    return v.dtype is None or v.dtype in FLOATS


def _is_const(v: ir.Value | None) -> bool:
    return v is not None and constant_chain(v) is not None


def mask_like_values(graph: ir.Graph) -> dict[str, str]:
    """Tensor name -> why it is mask-like: computed (through anything but a ``MASK_STOPS`` op) from a
    constant with a magnitude of at least ``MASK_MAGNITUDE``."""
    found: dict[str, str] = {}
    for node in graph:
        if node.op_type == "Constant" or node.op_type in MASK_STOPS:
            continue
        why = None
        for v in node.inputs:
            if v is None:
                continue
            if v.name in found:
                why = found[v.name]
                break
            chain = constant_chain(v) if v.producer() is None or v.producer().op_type == "Constant" else None
            if chain is not None and chain.tensor.dtype in FLOATS:
                arr = chain.tensor.numpy()
                if arr.size and float(np.max(np.abs(arr[np.isfinite(arr)]), initial=0.0)) >= MASK_MAGNITUDE \
                        or (arr.size and not np.isfinite(arr).all()):
                    why = f"computed from the mask-like constant {v.name} (|x| up to {float(np.max(np.abs(arr))):.3g})"
                    break
        if why:
            for out in node.outputs:
                if out is not None:
                    found[out.name] = why
    return found


def _core_unit(node: ir.Node) -> Unit | None:
    op = node.op_type
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    x, w = node.inputs[0], node.inputs[1]
    if op in ("Conv", "ConvTranspose"):
        if not _is_const(w):
            return Unit(node, [], skip_reason="the weight is not constant")
        axis = 1 if op == "ConvTranspose" else 0
        unit = Unit(node, [x.name], weight_index=1, weight_axis=axis)
        if op == "ConvTranspose" and node.attributes.get_int("group", 1) != 1:
            unit.skip_reason = "grouped ConvTranspose (per-channel axis would mix groups)"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            unit.bias_index = 2 if _is_const(node.inputs[2]) else None
        return unit
    if op == "MatMul":
        if _is_const(w):
            shape = constant_chain(w).array().shape
            if len(shape) != 2:
                return Unit(node, [], skip_reason=f"weight has rank {len(shape)}, not 2")
            return Unit(node, [x.name], weight_index=1, weight_axis=1)
        return Unit(node, [x.name, w.name])  # activation x activation (attention)
    if op == "Gemm":
        if node.attributes.get_int("transA", 0):
            return Unit(node, [], skip_reason="Gemm with transA=1")
        if not _is_const(w):
            return Unit(node, [x.name, w.name])
        unit = Unit(node, [x.name], weight_index=1, weight_axis=0 if node.attributes.get_int("transB", 0) else 1)
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and _is_const(c) and constant_chain(c).array().ndim == 1 \
                and node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0:
            unit.bias_index = 2
        return unit
    return None


def _output_after_chain(node: ir.Node) -> ir.Value | None:
    """The tensor to quantize after a core node: its output, or the end of a single-consumer Relu/Clip
    chain (onnxruntime folds those into the quantized range); None for a graph output or an integer."""
    v = node.outputs[0]
    while True:
        if v is None or v.is_graph_output() or not _is_float(v):
            return None
        uses = list(v.uses())
        if len(uses) == 1 and uses[0].node.op_type in ("Relu", "Clip") and _is_std(uses[0].node) \
                and uses[0].idx == 0:
            v = uses[0].node.outputs[0]
            continue
        return v


def _consumers_through_chain(v: ir.Value) -> list[ir.Node]:
    """Nodes reached from ``v`` through CHAIN_OPS (the pass-through ops themselves excluded)."""
    out, todo, seen = [], [v], set()
    while todo:
        cur = todo.pop()
        for use in cur.uses():
            node = use.node
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in CHAIN_OPS and _is_std(node) and node.op_type not in NEIGHBOUR_OPS:
                todo.extend(o for o in node.outputs if o is not None)
            else:
                out.append(node)
    return out


def _producer_through_chain(v: ir.Value) -> ir.Node | None:
    node = v.producer()
    while node is not None and node.op_type in CHAIN_OPS and node.op_type not in NEIGHBOUR_OPS and node.inputs:
        if node.inputs[0] is None:
            return None
        node = node.inputs[0].producer()
    return node


def plan_static(graph: ir.Graph, op_types: Collection[str] = CORE_OPS,
                neighbours: Collection[str] = NEIGHBOUR_OPS) -> Plan:
    """The units to quantize, in graph order, with ``skip_reason`` set on those that must stay float."""
    masks = mask_like_values(graph)
    units: dict[int, Unit] = {}
    for node in graph:
        if _is_std(node) and node.op_type in op_types and node.op_type in CORE_OPS:
            unit = _core_unit(node)
            if unit is not None:
                units[id(node)] = unit
    core_ids = {k for k, u in units.items() if u.skip_reason is None}

    # Neighbours: grow to a fixed point, since one neighbour's output may feed another.
    changed = True
    candidates = [n for n in graph if _is_std(n) and n.op_type in neighbours]
    while changed:
        changed = False
        quantized = core_ids | {k for k, u in units.items() if u.node.op_type in NEIGHBOUR_OPS}
        for node in candidates:
            if id(node) in units:
                continue
            ins = [v for v in node.inputs if v is not None]
            if not ins or any(_is_const(v) or not _is_float(v) for v in ins):
                continue
            if node.op_type in ("Add", "Mul", "Concat"):
                producers = [_producer_through_chain(v) for v in ins]
                if any(p is None or id(p) not in quantized for p in producers):
                    continue
            downstream = _consumers_through_chain(node.outputs[0])
            if not downstream or not any(id(d) in core_ids or d.op_type in neighbours for d in downstream):
                continue
            units[id(node)] = Unit(node, [v.name for v in ins], [node.outputs[0].name])
            changed = True

    for k in core_ids:  # after the neighbours: a Conv whose output one of them quantizes shares its Q
        u = units[k]
        if u.node.op_type in OUTPUT_OPS:
            out = _output_after_chain(u.node)
            if out is not None:
                u.outputs = [out.name]

    ordered = [units[id(n)] for n in graph if id(n) in units]
    for u in ordered:
        if u.skip_reason is None:
            bad = [t for t in u.tensors if t in masks]
            if bad:
                u.skip_reason = f"input {bad[0]} is {masks[bad[0]]}"
    return Plan(ordered)


@dataclass(frozen=True)
class TensorQuant:
    """Per-tensor activation qparams (decided by the caller)."""

    scale: float
    zero_point: int
    dtype: ir.DataType  # UINT8 or INT8; UINT16 or INT16 (opset 21) for sensitive tensors


@dataclass(frozen=True)
class WeightQuant:
    codes: np.ndarray  # int8, the weight as the node sees it
    scale: np.ndarray  # [C] float32
    axis: int
    bias_codes: np.ndarray | None = None  # int32 [C]
    bias_scale: np.ndarray | None = None  # [C] float32


def _float_type(value: ir.Value | None) -> type:
    """numpy type of the scales for ``value``: float16 for a float16 tensor, else float32."""
    return np.float16 if value is not None and value.dtype == ir.DataType.FLOAT16 else np.float32


class _Builder:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.dq_of: dict[str, ir.Value] = {}

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name, i = base, 0
        while name in self.graph.initializers:
            i += 1
            name = f"{base}_{i}"
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def qdq(self, value: ir.Value, q: TensorQuant, after: ir.Node | None) -> ir.Value:
        """Q -> DQ on ``value`` (one pair per tensor); returns the DQ output."""
        if value.name in self.dq_of:
            return self.dq_of[value.name]
        np_dtype = {ir.DataType.UINT8: np.uint8, ir.DataType.INT8: np.int8,
                    ir.DataType.UINT16: np.uint16, ir.DataType.INT16: np.int16}[q.dtype]
        # The scale has the type of the tensor quantized (float16 models: float16, opset >= 19).
        scale = self.initializer(f"{value.name}_scale", np.array(q.scale, dtype=_float_type(value)))
        zp = self.initializer(f"{value.name}_zero_point", np.array(q.zero_point, dtype=np_dtype))
        qn = ir.node("QuantizeLinear", [value, scale, zp], name=f"{value.name}_QuantizeLinear")
        qn.outputs[0].name = f"{value.name}_quantized"
        dqn = ir.node("DequantizeLinear", [qn.outputs[0], scale, zp], name=f"{value.name}_DequantizeLinear")
        dqn.outputs[0].name = f"{value.name}_dequantized"
        dqn.outputs[0].type = value.type
        dqn.outputs[0].shape = value.shape
        first = next(iter(self.graph), None)
        if after is None and first is not None:
            self.graph.insert_before(first, [qn, dqn])
        elif after is None:
            self.graph.extend([qn, dqn])
        else:
            self.graph.insert_after(after, [qn, dqn])
        self.dq_of[value.name] = dqn.outputs[0]
        return dqn.outputs[0]

    def weight_dq(self, node: ir.Node, index: int, base: str, codes: np.ndarray, scale: np.ndarray,
                  axis: int, dtype) -> None:
        c = self.initializer(f"{base}_quantized", codes.astype(dtype))
        s = self.initializer(f"{base}_scale", scale.astype(_float_type(node.inputs[index])))
        z = self.initializer(f"{base}_zero_point", np.zeros(scale.shape, dtype=dtype))
        attrs = {"axis": axis} if scale.ndim else {}
        dq = ir.node("DequantizeLinear", [c, s, z], attributes=attrs, name=f"{base}_DequantizeLinear")
        dq.outputs[0].name = f"{base}_dequantized"
        self.graph.insert_before(node, [dq])
        node.replace_input_with(index, dq.outputs[0])


def insert_qdq(model: ir.Model, units: Collection[Unit], tensors: Mapping[str, TensorQuant],
               weights: Mapping[str, WeightQuant]) -> None:
    """Insert QDQ for ``units`` (keyed by unit name in ``weights``); every tensor of a unit needs an
    entry in ``tensors``. Consumers that are not units keep reading the float tensor, except after a
    quantized neighbour, whose output every consumer reads through the DequantizeLinear."""
    graph = model.graph
    b = _Builder(graph)
    values = {v.name: v for v in graph.inputs}
    values.update({o.name: o for n in graph for o in n.outputs if o is not None})
    for u in units:
        node = u.node
        for i, v in enumerate(list(node.inputs)):
            if v is None or v.name not in u.inputs:
                continue
            after = v.producer()
            dq = b.qdq(v, tensors[v.name], after)
            node.replace_input_with(i, dq)
        for name in u.outputs:
            v = values[name]
            uses = [(use.node, use.idx) for use in v.uses()]
            graph_out = v.is_graph_output()
            dq = b.qdq(v, tensors[name], v.producer())
            for user, idx in uses:
                user.replace_input_with(idx, dq)
            if graph_out:  # the graph keeps its output name
                idx = list(graph.outputs).index(v)
                graph.outputs[idx] = dq
        wq = weights.get(u.name)
        if wq is not None and wq.bias_codes is not None and u.bias_index is None and node.op_type == "Conv":
            node.resize_inputs(3)  # a corrected bias for a Conv that had none
            u.bias_index = 2
        if wq is not None and u.weight_index is not None:
            b.weight_dq(node, u.weight_index, f"{u.name}.weight", wq.codes, wq.scale, wq.axis, np.int8)
            # An int32 bias with a float16 scale (activation scale x weight scale) would underflow:
            # float16 models keep their float bias.
            if wq.bias_codes is not None and u.bias_index is not None \
                    and _float_type(node.inputs[u.bias_index]) == np.float32:
                b.weight_dq(node, u.bias_index, f"{u.name}.bias", wq.bias_codes, wq.bias_scale, 0, np.int32)
