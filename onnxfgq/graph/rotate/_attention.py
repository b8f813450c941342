"""Attention heads' V / O projection pairs, for R2."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir

from onnxfgq.graph.rotate._common import _MS, _label, _last_dim, _op, _scalar
from onnxfgq.graph.rotate._norms import _producer, _through
from onnxfgq.graph.rotate._stream import _matmul_weight
from onnxfgq.graph.targets import constant_chain


# -------------------------------------------------------------------------------------- attention
def _single_use(value: ir.Value) -> ir.Node | None:
    uses = [u.node for u in value.uses() if not _op(u.node, "Shape", "Size")]
    return uses[0] if len(uses) == 1 else None


def _keeps_last_axis(transpose: ir.Node) -> bool:
    """A Transpose that leaves the last axis (the head size) where it is."""
    perm = transpose.attributes.get_ints("perm", None)
    return perm is not None and perm[-1] == len(perm) - 1


def _o_proj(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The output projection fed (through Transpose/Reshape keeping the head size last) by ``value``."""
    for _ in range(8):
        node = _single_use(value)
        if node is None:
            return None
        if _op(node, "Transpose"):
            if not _keeps_last_axis(node):
                return None
        elif not _op(node, "Reshape", "Cast", "Identity"):
            w = _matmul_weight(node)
            return (node, w[0]) if w is not None and not w[1] and node.inputs[0] is value else None
        value = node.outputs[0]
    return None


def _v_proj(value: ir.Value) -> tuple[list[tuple[ir.Node, int, str]], int | None, bool] | None:
    """V's projection weight (and bias) traced back from the value input of ``P @ V``; with a head size
    seen on the way (a static shape, a Reshape's constant shape, the KV cache input's shape), and whether
    it passes through a KV cache (a Concat with a graph input)."""
    consts: list[tuple[ir.Node, int, str]] = []
    head = _last_dim(value)
    cached = False
    for _ in range(16):
        node = value.producer()
        if node is None:
            return None
        if _op(node, "Transpose"):
            if not _keeps_last_axis(node):
                return None
        elif _op(node, "Reshape"):
            chain = constant_chain(node.inputs[1])
            if chain is not None and head is None and int(chain.array().reshape(-1)[-1]) > 0:
                head = int(chain.array().reshape(-1)[-1])
            shape_src = node.inputs[1].producer()
            if head is None and _op(shape_src, "Concat"):
                last = _scalar(shape_src.inputs[-1])
                head = int(last) if last is not None and last > 0 else None
        elif _op(node, "Unsqueeze", "Expand", "Cast", "Identity"):
            pass
        elif _op(node, "Concat"):  # with the KV cache
            cached = True
            live = [v for v in node.inputs if not v.is_graph_input()]
            for v in node.inputs:
                if v.is_graph_input() and head is None:
                    head = _last_dim(v)
            if len(live) != 1 or node.attributes.get_int("axis", 0) in (-1, len(value.shape or ()) - 1):
                return None
            value = live[0]
            continue
        elif _op(node, "Add"):
            c = [i for i, v in enumerate(node.inputs) if constant_chain(v) is not None]
            if len(c) != 1:
                return None
            consts.append((node, c[0], "bias"))
            value = node.inputs[1 - c[0]]
            continue
        else:
            w = _matmul_weight(node)
            if w is None or w[1]:
                return None
            consts.append((node, w[0], "weight"))
            return consts, head, cached
        value = node.inputs[0]
        if head is None:
            head = _last_dim(value)
    return None


def _is_probs(value: ir.Value, depth: int = 0) -> bool:
    """``value`` is attention probabilities: a Softmax, through casts and a NaN guard (optimum's
    ``Where(IsNaN(p), 0, p)``)."""
    value = _through(value, ("Cast", "Identity", "Dropout"))
    if _producer(value, "Softmax") is not None:
        return True
    where = _producer(value, "Where")
    return where is not None and depth < 4 and any(_is_probs(v, depth + 1) for v in where.inputs[1:])


def _attentions(graph: ir.Graph) -> Iterator[tuple[list[tuple[ir.Node, int, str, tuple[int, int] | None]],
                                                    tuple[ir.Node, int], int, bool] | str]:
    """Per attention: (V constants with their column span, the O weight slot, head size, through a KV
    cache), or why not."""
    for node in graph:
        if _op(node, "GroupQueryAttention", domains=_MS):
            heads, kv = node.attributes.get_int("num_heads", 0), node.attributes.get_int("kv_num_heads", 0)
            o = _o_proj(node.outputs[0])
            packed = len(node.inputs) < 2 or node.inputs[1] is None
            src = node.inputs[0] if packed else node.inputs[2]
            found = _v_proj(src) if src is not None else None
            if o is None or found is None or not heads or not kv:
                yield f"{_label(node)}: V or O projection not found"
                continue
            consts, _, _ = found
            cached = len(node.inputs) > 4 and node.inputs[4] is not None
            w_node, w_idx, _ = consts[-1]
            n = int(constant_chain(w_node.inputs[w_idx]).array().shape[1])
            if packed:
                if n % (heads + 2 * kv):
                    yield f"{_label(node)}: packed QKV width {n} is not (heads + 2 kv heads) x head size"
                    continue
                hd = n // (heads + 2 * kv)
                span = ((heads + kv) * hd, n)
            else:
                hd, span = n // kv, (0, n)
            yield [(c[0], c[1], c[2], span) for c in consts], o, hd, cached
        elif _op(node, "MatMul") and _is_probs(node.inputs[0]) and constant_chain(node.inputs[1]) is None:
            o = _o_proj(node.outputs[0])
            found = _v_proj(node.inputs[1])
            if o is None or found is None or found[1] is None:
                yield f"{_label(node)}: V or O projection (or the head size) not found"
                continue
            consts, hd, cached = found
            w_node, w_idx, _ = consts[-1]
            n = int(constant_chain(w_node.inputs[w_idx]).array().shape[1])
            yield [(c[0], c[1], c[2], (0, n)) for c in consts], o, hd, cached
