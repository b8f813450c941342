"""Roles of weights in a language model, found from the graph's structure (never from node names,
which differ per exporter: ``/lm_head/MatMul``, ``node_linear_14``, ``/lm/lm_head/MatMul``).

- the token embedding: a Gather (axis 0) of a constant 2-D table indexed by an integer graph input
  (``input_ids`` when several qualify, else the largest table);
- the output projection (lm_head): the MatMul/Gemm with a constant weight whose result reaches a
  graph output only through shape, cast and scaling ops, and whose width is the vocabulary (the
  token table's row count, or the output is named ``logits``).

A graph without both (an encoder, a CNN) has no lm_head role, so ``--lm-head`` leaves it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.config import LMHead, Selection, WeightConfig
from onnxfgq.graph.targets import Target, constant_chain

_INDEX_PATH = ("Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten")
# Between the projection and the logits output: layout changes, a bias, a scale or a soft cap.
_TO_OUTPUT = ("Reshape", "Cast", "Identity", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
              "Add", "Mul", "Div", "Tanh")
_INTEGER = (ir.DataType.INT64, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT16)


@dataclass(frozen=True)
class Roles:
    embedding: ir.Node | None  # the token embedding Gather
    lm_head: ir.Node | None  # the output projection MatMul/Gemm

    @property
    def tied(self) -> bool:
        """The lm_head holds the embedding table: the same tensor (through Transpose/Cast), or a
        transposed copy with equal contents (what exporters often store), so emit can store it once."""
        if self.embedding is None or self.lm_head is None:
            return False
        table, head = constant_chain(self.embedding.inputs[0]), constant_chain(self.lm_head.inputs[1])
        if table is None or head is None:
            return False
        if table.tensor is head.tensor:
            return True
        rows, cols = (int(d) for d in table.tensor.shape)
        if sorted(int(d) for d in head.tensor.shape) != sorted((rows, cols)):
            return False
        transposed = self.lm_head.op_type == "Gemm" and self.lm_head.attributes.get_int("transB", 0)
        if not table.ops and not head.ops:  # raw tensors (memory-mapped when external): a few rows first
            t, w = table.tensor.numpy(), head.tensor.numpy()
            w = w if transposed else w.T  # as [rows, cols]
            if w.shape != (rows, cols):
                return False
            # two 7B-shaped tables (32000 x 4096) are 1 GB to read and compare; untied ones differ at once
            if any(not np.array_equal(w[r], t[r]) for r in np.unique(np.linspace(0, rows - 1, 8).astype(int))):
                return False
        w = head.array()
        if transposed:
            w = w.T
        return w.shape == (cols, rows) and bool(np.array_equal(w.T, table.array()))


def _index_input(value: ir.Value | None) -> ir.Value | None:
    while value is not None and not value.is_graph_input():
        node = value.producer()
        if node is None or node.op_type not in _INDEX_PATH:
            return None
        value = node.inputs[0]
    return value


def token_embedding(graph: ir.Graph) -> ir.Node | None:
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        if node.attributes.get_int("axis", 0) != 0:
            continue
        table = constant_chain(node.inputs[0])
        source = _index_input(node.inputs[1])
        if table is None or source is None or len(table.tensor.shape) != 2 or source.dtype not in _INTEGER:
            continue
        found.append((source.name == "input_ids", table.tensor.shape[0], node))
    return max(found, key=lambda f: f[:2])[2] if found else None


def _projection_before(value: ir.Value) -> ir.Node | None:
    """The MatMul/Gemm with a constant weight that ``value`` is computed from, through _TO_OUTPUT ops."""
    seen = 0
    while seen < 16:
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type in ("MatMul", "Gemm"):
            return node if len(node.inputs) > 1 and constant_chain(node.inputs[1]) is not None else None
        if node.op_type not in _TO_OUTPUT:
            return None
        # Follow the one non-constant input (a bias or a scale is the constant one).
        live = [v for v in node.inputs if v is not None and constant_chain(v) is None]
        if len(live) != 1:
            return None
        value, seen = live[0], seen + 1
    return None


def _width(node: ir.Node) -> int | None:
    chain = constant_chain(node.inputs[1])
    shape = chain.array().shape if chain.ops else tuple(chain.tensor.shape.numpy())
    if len(shape) != 2:
        return None
    transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
    return int(shape[0] if transposed else shape[1])


def find_roles(graph: ir.Graph) -> Roles:
    embedding = token_embedding(graph)
    vocab = int(embedding.inputs[0].shape[0]) if embedding is not None and embedding.inputs[0].shape else None
    if embedding is not None and vocab is None:
        vocab = int(constant_chain(embedding.inputs[0]).tensor.shape[0])
    heads = []
    for out in graph.outputs:
        node = _projection_before(out)
        if node is None:
            continue
        width = _width(node)
        if width is not None and (width == vocab or (out.name == "logits" and embedding is None)):
            heads.append((out.name == "logits", node))
    lm_head = max(heads, key=lambda h: h[0])[1] if heads else None
    return Roles(embedding, lm_head)


def logits_output(graph: ir.Graph) -> str | None:
    """The name of the graph output a causal LM's lm_head produces (None without an lm_head)."""
    head = find_roles(graph).lm_head
    if head is None:
        return None
    return next((out.name for out in graph.outputs if _projection_before(out) is head), None)


@dataclass
class RolePolicy:
    """What ``--lm-head`` decided: bit widths that differ from the configured one, and report notes."""

    bits: dict[int, int] = field(default_factory=dict)  # id(node) -> bits
    notes: list[str] = field(default_factory=list)
    lm_head: str | None = None  # the output projection's name, where the graph has one (a causal LM)

    def bits_for(self, t: Target, default: int) -> int:
        return self.bits.get(id(t.node), default)


def resolve_lm_head(mode: LMHead, weights: WeightConfig) -> LMHead:
    """``auto``: like the rest. An 8-bit lm_head is more accurate, but it decodes about 10% slower
    than the builder's all-4-bit int4 even at accuracy_level 4 (0.86-0.96x of it on the 123M Llama,
    where 4 bits gave 0.92-1.18x), and at accuracy_level 0 several times slower; it is ``--lm-head 8``."""
    del weights
    return LMHead.SAME if mode is LMHead.AUTO else mode


def apply_lm_head(graph: ir.Graph, targets: list[Target], selection: Selection,
                  weights: WeightConfig | None = None) -> RolePolicy:
    """Mark the lm_head (and a tied embedding table) float or 8-bit as ``selection.lm_head`` says."""
    policy = RolePolicy()
    roles = find_roles(graph)
    if roles.lm_head is None:
        return policy
    by_node = {id(t.node): t for t in targets}
    head = by_node.get(id(roles.lm_head))
    tied = by_node.get(id(roles.embedding)) if roles.tied and roles.embedding is not None else None
    name = head.name if head is not None else roles.lm_head.name
    policy.lm_head = name
    policy.notes.append(f"lm_head (output projection, found by role): {name}"
                        + (f", tied to the embedding {tied.name}" if tied is not None else ""))
    mode = resolve_lm_head(selection.lm_head, weights or WeightConfig())
    if selection.lm_head is LMHead.AUTO:
        policy.notes[-1] += (": quantized like the rest (--lm-head auto; --lm-head 8 is more accurate and "
                             "decodes about 10% slower)")
    for t in (head, tied):
        if t is None or t.skip_reason is not None or mode is LMHead.SAME:
            continue
        if mode is LMHead.FLOAT:
            t.skip_reason = "lm_head kept in float (--lm-head float)" if t is head else \
                "tied to the lm_head, kept in float with it (--lm-head float)"
        else:
            policy.bits[id(t.node)] = 8
    return policy


__all__ = ["RolePolicy", "Roles", "apply_lm_head", "find_roles", "resolve_lm_head", "token_embedding"]
