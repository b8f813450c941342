"""Find the weights to quantize: MatMul / Gemm (and Gather, Conv) nodes fed by a constant.

A constant is an initializer or a Constant node, possibly reached through Identity, Cast or
Transpose. Each target knows how to read its weight as a MatMul-oriented ``[K, N]`` array without
touching the graph, and the key that identifies the underlying tensor, so shared weights are
quantized once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.config import Selection

PASS_THROUGH = ("Identity", "Cast", "Transpose")


@dataclass(frozen=True)
class ConstantChain:
    """A constant tensor and the pass-through ops between it and its use."""

    root: ir.Value
    tensor: ir.TensorProtocol
    ops: tuple[ir.Node, ...]  # nearest to the root first

    def array(self) -> np.ndarray:
        x = self.tensor.numpy()
        if isinstance(self.tensor, ir.ExternalTensor):
            # onnx_ir maps the whole data file per tensor; copy this one out and unmap, so pages of
            # weights already processed don't stay resident on multi-GB models.
            x = np.array(x, copy=True)
            self.tensor.release()
        for op in self.ops:
            if op.op_type == "Transpose":
                perm = op.attributes.get_ints("perm", None)
                x = np.transpose(x, perm)
            elif op.op_type == "Cast":
                to = ir.DataType(op.attributes.get_int("to"))
                x = x.astype(to.numpy())
        return x

    @property
    def key(self) -> tuple:
        return (id(self.root),) + tuple(
            (op.op_type, tuple(op.attributes.get_ints("perm", ()) or ()), op.attributes.get_int("to", 0))
            for op in self.ops
        )


def constant_chain(value: ir.Value | None) -> ConstantChain | None:
    ops: list[ir.Node] = []
    while value is not None:
        if value.const_value is not None and value.producer() is None:
            return ConstantChain(value, value.const_value, tuple(reversed(ops)))
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            attr = node.attributes.get("value")
            if attr is None:
                return None
            return ConstantChain(value, attr.as_tensor(), tuple(reversed(ops)))
        if node.op_type in PASS_THROUGH and node.domain in ("", "ai.onnx"):
            ops.append(node)
            value = node.inputs[0]
            continue
        return None
    return None


@dataclass
class Target:
    """One node whose weight input is constant."""

    node: ir.Node
    input_index: int
    chain: ConstantChain
    kind: str  # "matmul" | "gather" | "conv"
    transposed: bool = False  # Gemm transB=1: the node sees W as [N, K]
    scope: str = "graph"  # "graph" (main graph), "body" (If/Loop/Scan body), "function" (model-local)
    shape_kn: tuple[int, int] = (0, 0)
    skip_reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.name or self.node.outputs[0].name

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight as the node sees it."""
        if self.kind == "matmul":
            k, n = self.shape_kn
            return (n, k) if self.transposed else (k, n)
        return tuple(self.chain.tensor.shape.numpy()) if not self.chain.ops else self.chain.array().shape

    @property
    def reduced_axis(self) -> int:
        """The axis of the weight, as the node sees it, that the node sums over (blocks run along it)."""
        if self.kind == "matmul":
            return 1 if self.transposed else 0
        return 1

    @property
    def channel_axis(self) -> int:
        """The output-channel axis of the weight as the node sees it."""
        if self.kind == "matmul":
            return 0 if self.transposed else 1
        return 0

    def weight(self) -> np.ndarray:
        """The weight as float32, oriented for quantization: ``[K, N]`` for MatMul and Gemm (whatever
        transB says), the node's own layout for Gather (``[rows, hidden]``) and Conv (``[O, I, kh, kw]``)."""
        w = self.chain.array()
        if self.kind == "matmul" and self.transposed:
            w = w.T
        return np.ascontiguousarray(w, dtype=np.float32)

    @property
    def quant_axes(self) -> tuple[int, int]:
        """(reduced axis, channel axis) of the array ``weight()`` returns."""
        return (0, 1) if self.kind == "matmul" else (self.reduced_axis, self.channel_axis)


def _gemm_problem(node: ir.Node) -> str | None:
    if node.attributes.get_int("transA", 0):
        return "Gemm with transA=1"
    if node.attributes.get_float("alpha", 1.0) != 1.0:
        return "Gemm with alpha != 1"
    return None


def _classify(node: ir.Node) -> Target | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None
    if op in ("MatMul", "Gemm") and len(node.inputs) >= 2:
        chain = constant_chain(node.inputs[1])
        if chain is None:
            return None
        t = Target(node, 1, chain, "matmul", transposed=bool(op == "Gemm" and node.attributes.get_int("transB", 0)))
        shape = tuple(chain.tensor.shape.numpy()) if chain.ops == () else chain.array().shape
        if len(shape) != 2:
            t.skip_reason = f"weight has rank {len(shape)}, not 2"
            return t
        t.shape_kn = (shape[1], shape[0]) if t.transposed else (shape[0], shape[1])
        if op == "Gemm":
            t.skip_reason = _gemm_problem(node)
        return t
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0:
        chain = constant_chain(node.inputs[0])
        if chain is None or len(chain.tensor.shape) != 2:
            return None
        rows, cols = chain.tensor.shape.numpy()
        return Target(node, 0, chain, "gather", shape_kn=(cols, rows))
    if op == "Conv":
        chain = constant_chain(node.inputs[1])
        if chain is None:
            return None
        shape = chain.tensor.shape.numpy()
        k = int(np.prod(shape[1:]))
        t = Target(node, 1, chain, "conv", shape_kn=(k, shape[0]))
        if node.attributes.get_int("group", 1) != 1:
            t.skip_reason = "grouped convolution"
        return t
    return None


def is_float(chain: ConstantChain) -> bool:
    return chain.tensor.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def scoped_nodes(model_or_graph: ir.Model | ir.Graph) -> Iterator[tuple[ir.Node, str]]:
    """(node, scope) over the main graph, then its control-flow bodies (any depth), then the graphs
    of model-local functions (given a model) and their bodies."""
    graph = model_or_graph.graph if isinstance(model_or_graph, ir.Model) else model_or_graph
    yield from ((n, "graph") for n in graph)
    for body in graph.subgraphs():
        yield from ((n, "body") for n in body)
    if isinstance(model_or_graph, ir.Model):
        for function in model_or_graph.functions.values():
            yield from ((n, "function") for n in function.graph)
            for body in function.graph.subgraphs():
                yield from ((n, "function-body") for n in body)


def find_targets(model_or_graph: ir.Model | ir.Graph, selection: Selection) -> Iterator[Target]:
    """Targets in graph order (main graph, control-flow bodies, then model-local functions when given
    a model), with ``skip_reason`` set on those the selection or shape rules out."""
    include = [re.compile(p) for p in selection.include]
    exclude = [re.compile(p) for p in selection.exclude]
    kinds = set(selection.op_types) | ({"Gather"} if selection.quantize_embeddings else set())
    for node, scope in scoped_nodes(model_or_graph):
        if node.op_type not in kinds:
            continue
        t = _classify(node)
        if t is None:
            continue
        t.scope = scope
        if scope == "function-body":
            t.skip_reason = "inside a control-flow body of a model-local function"
        if t.skip_reason is None:
            t.skip_reason = _selection_problem(t, selection, include, exclude)
        yield t


def _selection_problem(t: Target, sel: Selection, include: list, exclude: list) -> str | None:
    name = t.name
    if include and not any(p.search(name) for p in include):
        return "not matched by --include"
    if any(p.search(name) for p in exclude):
        return "matched by --exclude"
    if not is_float(t.chain):
        return f"weight is {t.chain.tensor.dtype.name}, not float"
    k, n = t.shape_kn
    if k * n < sel.min_elements:
        return f"{k * n} elements < --min-elements {sel.min_elements}"
    return None


def has_foldable_weights(graph: ir.Graph, op_types: tuple[str, ...]) -> bool:
    """True when some weight input is computed from constants by ops we don't see through
    (Reshape of an initializer, ConstantOfShape, ...): constant folding would expose it."""
    memo: dict[int, bool] = {}

    def constant_derived(value: ir.Value | None, depth: int = 0) -> bool:
        if value is None:
            return True
        if value.const_value is not None:
            return True
        if value.is_graph_input() or depth > 64:
            return False
        if id(value) in memo:
            return memo[id(value)]
        node = value.producer()
        result = node is not None and node.op_type not in ("RandomNormal", "RandomUniform", "Multinomial") \
            and all(constant_derived(v, depth + 1) for v in node.inputs)
        memo[id(value)] = result
        return result

    for node in graph:
        if node.op_type in op_types or node.op_type == "Gather":
            idx = 0 if node.op_type == "Gather" else 1
            if len(node.inputs) > idx and constant_chain(node.inputs[idx]) is None \
                    and constant_derived(node.inputs[idx]):
                return True
    return False


def unique_initializer_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... : the first name no initializer of ``graph`` has."""
    name, i = base, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    return name


def add_initializer(graph: ir.Graph, base: str, array) -> ir.Value:
    """A new initializer holding ``array`` under a unique name derived from ``base``."""
    name = unique_initializer_name(graph, base)
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value
