"""The norms on the residual stream, in every form the exporters emit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxfgq.graph.rotate._common import _DEFAULT, _MS, _SAME, _label, _last_axis_only, _op, _scalar
from onnxfgq.graph.targets import constant_chain


# ------------------------------------------------------------------------------------------ norms
@dataclass
class Norm:
    kind: str
    label: str
    inputs: list[ir.Value]  # what it reads from the stream (X, and the skip of a Skip* norm)
    output: ir.Value  # the normalized (and scaled) value the readers take
    members: set[int]  # ids of the nodes that read ``inputs`` as part of the norm
    gamma_slot: tuple[ir.Node, int] | None  # where the scale sits (node, input index)
    stream_output: ir.Value | None = None  # SkipSimplifiedLayerNormalization's input + skip
    mean_subtracting: bool = False
    beta: bool = False  # LayerNormalization with a bias

    def beta_values(self) -> tuple[float, ...] | None:
        node = self.output.producer()
        chain = constant_chain(node.inputs[2]) if node is not None and len(node.inputs) > 2 else None
        return None if chain is None else tuple(float(x) for x in chain.array().reshape(-1))

    def gamma(self) -> np.ndarray | None:
        if self.gamma_slot is None:
            return None
        node, i = self.gamma_slot
        chain = constant_chain(node.inputs[i])
        return None if chain is None else chain.array()


def _producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if _op(node, *ops) else None


def _through(value: ir.Value, ops: tuple[str, ...] = _SAME) -> ir.Value:
    """``value`` traced back through ``ops`` (single-input pass-throughs)."""
    while (node := _producer(value, *ops)) is not None:
        value = node.inputs[0]
    return value


def _decomposed_rms(mean: ir.Node) -> Norm | None:
    """The RMSNorm around ``mean`` (a ReduceMean of x^2 over the last axis), or None."""
    if not _last_axis_only(mean):
        return None
    sq = mean.inputs[0].producer()
    squares = (_op(sq, "Pow") and _scalar(sq.inputs[1]) == 2.0) or (_op(sq, "Mul") and sq.inputs[0] is sq.inputs[1])
    if not squares:
        return None
    x = sq.inputs[0]
    # mean -> Add(eps) -> Sqrt -> (Reciprocal | Div(1, .)) -> Mul(x, .)   or   -> Div(x, .)
    uses = [u.node for u in mean.outputs[0].uses()]
    if len(uses) != 1 or not _op(uses[0], "Add"):
        return None
    sqrt = [u.node for u in uses[0].outputs[0].uses()]
    if len(sqrt) != 1 or not _op(sqrt[0], "Sqrt"):
        return None
    after = [u.node for u in sqrt[0].outputs[0].uses()]
    if len(after) != 1:
        return None
    nxt = after[0]
    scaled = None
    if _op(nxt, "Div") and nxt.inputs[1] is sqrt[0].outputs[0] and nxt.inputs[0] is x:
        scaled = nxt
    elif _op(nxt, "Reciprocal") or (_op(nxt, "Div") and nxt.inputs[1] is sqrt[0].outputs[0]
                                     and _scalar(nxt.inputs[0]) == 1.0):
        inv = nxt.outputs[0]
        muls = [u.node for u in inv.uses()]
        if len(muls) == 1 and _op(muls[0], "Mul") and x in muls[0].inputs:
            scaled = muls[0]
    if scaled is None:
        return None
    out = scaled.outputs[0]
    # optionally a Cast, then Mul(gamma) with a constant vector
    users = [u.node for u in out.uses()]
    if len(users) == 1 and _op(users[0], "Cast"):
        out = users[0].outputs[0]
        users = [u.node for u in out.uses()]
    gamma_slot = None
    if len(users) == 1 and _op(users[0], "Mul"):
        m = users[0]
        other = 1 if m.inputs[0] is out else 0
        chain = constant_chain(m.inputs[other])
        if chain is not None and chain.array().ndim == 1:
            gamma_slot, out = (m, other), m.outputs[0]
    return Norm("RMSNorm (decomposed)", _label(mean), [x], out, {id(sq), id(scaled)}, gamma_slot)


def find_norms(graph: ir.Graph) -> list[Norm]:
    norms = []
    for node in graph:
        if _op(node, "SimplifiedLayerNormalization", domains=_DEFAULT + _MS) or _op(node, "RMSNormalization"):
            if node.attributes.get_int("axis", -1) != -1:
                continue
            norms.append(Norm(node.op_type, _label(node), [node.inputs[0]], node.outputs[0], {id(node)}, (node, 1)))
        elif _op(node, "SkipSimplifiedLayerNormalization", domains=_MS):
            if len(node.inputs) > 3 and node.inputs[3] is not None:
                continue  # a bias inside the sum: not seen in exports; left alone
            sum_out = node.outputs[3] if len(node.outputs) > 3 and node.outputs[3].name else None
            norms.append(Norm(node.op_type, _label(node), [node.inputs[0], node.inputs[1]], node.outputs[0],
                              {id(node)}, (node, 2), stream_output=sum_out))
        elif _op(node, "LayerNormalization") or _op(node, "SkipLayerNormalization", domains=_MS):
            beta = len(node.inputs) > 2 and node.inputs[2] is not None
            ins = [node.inputs[0]] + ([node.inputs[1]] if node.op_type.startswith("Skip") else [])
            norms.append(Norm(node.op_type, _label(node), ins, node.outputs[0], {id(node)}, (node, 1),
                              mean_subtracting=True, beta=beta))
        elif _op(node, "ReduceMean"):
            found = _decomposed_rms(node)
            if found is not None:
                norms.append(found)
    return norms
