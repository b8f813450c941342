"""Graph side of the float-exact rewrites before static quantization (the arithmetic: algorithms/cle.py).

- :func:`fold_affines`: a per-tensor or per-channel constant ``Mul`` / ``Add`` right before or after a
  Conv goes into the Conv's weight and bias (PP-OCR's learnable affine blocks, a scalar ``Add`` before
  HardSwish). Exact; a shift before a padded Conv is moved in front of the scale instead
  (``conv(a x + c) = conv_{w a}(x + c / a)``), since padding sees zeros, not ``c``.
- :func:`depthwise_pairs` / :func:`equalize_activations`: Conv -> [Relu] -> depthwise Conv pairs
  rescaled from the calibrated per-channel range of the tensor between them (data-aware; exact).
- :func:`equalize`: cross-layer equalisation of Conv -> [Relu] -> Conv pairs (group 1 or depthwise
  second conv). Only through Relu or nothing: positively homogeneous, so exact in float. Pairs
  through HardSwish, Clip with an upper bound, or anything else are left alone and counted.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms.cle import (
    activation_scales,
    apply_scales,
    equalize_scales,
    fold_input_affine,
    fold_output_affine,
)
from onnxfgq.graph.targets import add_initializer, constant_chain

STD = ("", "ai.onnx")


def _const(value: ir.Value | None) -> np.ndarray | None:
    chain = constant_chain(value) if value is not None else None
    return None if chain is None else chain.array()


def _set(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
    value = add_initializer(graph, f"{node.name or node.outputs[0].name}.{suffix}", array)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _conv(node: ir.Node | None) -> bool:
    """A float Conv with constant weight and bias (if any) that these rewrites may change."""
    if node is None or node.op_type != "Conv" or node.domain not in STD or len(node.inputs) < 2:
        return False
    w = node.inputs[1]
    if _const(w) is None or _const(w).dtype != np.float32:
        return False
    return len(node.inputs) < 3 or node.inputs[2] is None or _const(node.inputs[2]) is not None


def _weights(conv: ir.Node) -> tuple[np.ndarray, np.ndarray | None]:
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    return _const(conv.inputs[1]), (_const(b) if b is not None else None)


def _only_use(v: ir.Value) -> ir.Node | None:
    uses = list(v.uses())
    if len(uses) != 1 or v.is_graph_output():
        return None
    return uses[0].node


def _affine_operand(node: ir.Node, channels: int) -> tuple[ir.Value, np.ndarray] | None:
    """(variable input, constant) of an Add/Mul whose constant is a scalar or one value per channel of
    an NCHW tensor with ``channels`` channels."""
    if node.op_type not in ("Add", "Mul") or node.domain not in STD or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    ca, cb = _const(a), _const(b)
    if (ca is None) == (cb is None):
        return None
    var, c = (b, ca) if ca is not None else (a, cb)
    if c.dtype != np.float32 or not np.isfinite(c).all():
        return None
    if c.size == 1 and c.ndim <= 4:
        return var, c.reshape(1)
    shape = list(c.shape)
    while shape and shape[0] == 1:
        shape.pop(0)
    if len(shape) == 3 and shape[0] == channels and shape[1:] == [1, 1]:
        return var, c.reshape(-1)
    return None


def _no_padding(conv: ir.Node) -> bool:
    auto = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        return False
    return not any(conv.attributes.get_ints("pads", ()) or ())


def _remove(graph: ir.Graph, node: ir.Node, keep: ir.Value, *, rename: bool = False) -> None:
    """Drop an elementwise ``node``: its users read ``keep`` instead (which takes the output's name
    with ``rename``: a Conv output that had no other user)."""
    out = node.outputs[0]
    name = out.name
    out.replace_all_uses_with(keep, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if rename:
        keep.name = name


def _fold_after(graph: ir.Graph, conv: ir.Node) -> bool:
    user = _only_use(conv.outputs[0])
    w, b = _weights(conv)
    found = _affine_operand(user, w.shape[0]) if user is not None else None
    if found is None:
        return False
    _, c = found
    scale, shift = (c, None) if user.op_type == "Mul" else (None, c)
    new_w, new_b = fold_output_affine(w, b, scale, shift)
    _set(graph, conv, 1, new_w, "affine_weight")
    _set(graph, conv, 2, new_b, "affine_bias")
    _remove(graph, user, conv.outputs[0], rename=True)
    return True


def _fold_before(graph: ir.Graph, conv: ir.Node) -> bool:
    x = conv.inputs[0]
    prod = x.producer() if x is not None else None
    if prod is None or _only_use(x) is not conv:
        return False
    w, b = _weights(conv)
    group = conv.attributes.get_int("group", 1)
    cin = w.shape[1] * group
    found = _affine_operand(prod, cin)
    if found is None:
        return False
    var, c = found
    if prod.op_type == "Mul":
        new_w, new_b = fold_input_affine(w, b, group, c, None)
    elif _no_padding(conv):
        new_w, new_b = fold_input_affine(w, b, group, None, c)
    else:  # a shift before a padded conv: move it in front of a scale that can fold, if there is one
        mul = var.producer()
        inner = _affine_operand(mul, cin) if mul is not None and _only_use(var) is prod else None
        if inner is None or mul.op_type != "Mul" or not np.all(inner[1] != 0):
            return False
        a = inner[1]
        k = 0 if prod.inputs[0] is not var else 1  # the Add's constant input
        shifted = (c / a).astype(np.float32)
        _set(graph, prod, k, shifted.reshape(_const(prod.inputs[k]).shape if shifted.size == c.size
                                             else (1, -1, 1, 1)), "shifted")
        new_w, new_b = fold_input_affine(w, b, group, a, None)
        _set(graph, conv, 1, new_w, "affine_weight")
        _set(graph, conv, 2, new_b, "affine_bias")
        _remove(graph, mul, inner[0])
        return True
    _set(graph, conv, 1, new_w, "affine_weight")
    _set(graph, conv, 2, new_b, "affine_bias")
    _remove(graph, prod, var)
    return True


def fold_affines(model: ir.Model) -> list[str]:
    """Fold constant Mul/Add next to Convs into them, in place; returns a note (empty if none)."""
    graph = model.graph
    folded = 0
    changed = True
    while changed:
        changed = False
        for conv in [n for n in graph if _conv(n)]:
            while _fold_after(graph, conv) or _fold_before(graph, conv):
                folded += 1
                changed = True
    return [f"folded {folded} constant Mul/Add into the adjacent Conv (exact)"] if folded else []


def _pair_through(conv: ir.Node) -> tuple[ir.Node | None, str]:
    """(second conv, '') for an equalisable pair starting at ``conv``, else (None, why not)."""
    v = conv.outputs[0]
    ops = sorted(u.node.op_type for u in v.uses())
    if ops == ["HardSigmoid", "Mul"]:
        return None, "through HardSwish (not positively homogeneous)"
    node = _only_use(v)
    if node is not None and node.op_type == "Relu" and node.domain in STD:
        v, node = node.outputs[0], _only_use(node.outputs[0])
    if node is None:
        return None, ""
    if node.op_type in ("Clip", "HardSwish", "Sigmoid", "Tanh"):
        return None, f"through {node.op_type} (not positively homogeneous)"
    if not _conv(node) or node.inputs[0] is not v:
        return None, ""
    return node, ""


def equalize(model: ir.Model, sweeps: int = 4) -> list[str]:
    """Cross-layer equalisation of every Conv -> [Relu] -> Conv pair, ``sweeps`` passes over the graph
    (a chain of pairs converges over repeated passes), in place; returns notes."""
    graph = model.graph
    pairs, skipped = [], {}
    for conv in [n for n in graph if _conv(n)]:
        second, why = _pair_through(conv)
        if second is None:
            if why.startswith("through"):
                skipped[why] = skipped.get(why, 0) + 1
            continue
        group2 = second.attributes.get_int("group", 1)
        w2 = _weights(second)[0]
        if group2 > 1 and group2 == w2.shape[0] and w2.shape[1] == 1:
            skipped["into a depthwise conv (rescaled from calibrated ranges instead)"] = \
                skipped.get("into a depthwise conv (rescaled from calibrated ranges instead)", 0) + 1
            continue
        if equalize_scales(_weights(conv)[0], _weights(second)[0], group2) is None:
            skipped["grouped second conv"] = skipped.get("grouped second conv", 0) + 1
            continue
        pairs.append((conv, second, group2))
    for _ in range(sweeps):
        for first, second, group2 in pairs:
            w1, b1 = _weights(first)
            w2, _ = _weights(second)
            s = equalize_scales(w1, w2, group2)
            new_w1, new_b1, new_w2 = apply_scales(w1, b1, w2, group2, s)
            _set(graph, first, 1, new_w1, "cle_weight")
            if new_b1 is not None:
                _set(graph, first, 2, new_b1, "cle_bias")
            _set(graph, second, 1, new_w2, "cle_weight")
    notes = [f"cross-layer equalisation: {len(pairs)} Conv pair(s) equalised"]
    if skipped:
        notes.append("cross-layer equalisation left alone: " + ", ".join(f"{n} pair(s) {k}" for k, n in skipped.items()))
    return notes


def depthwise_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node, str]]:
    """(first conv, depthwise conv, the tensor between them) for every Conv -> [Relu] -> depthwise Conv."""
    pairs = []
    for conv in [n for n in model.graph if _conv(n)]:
        second, _ = _pair_through(conv)
        if second is None:
            continue
        c = _weights(conv)[0].shape[0]
        w2 = _weights(second)[0]
        if second.attributes.get_int("group", 1) == c and w2.shape[0] == c and w2.shape[1] == 1:
            pairs.append((conv, second, second.inputs[0].name))
    return pairs


def equalize_activations(model: ir.Model, channel_absmax: dict[str, np.ndarray]) -> list[str]:
    """Rescale each :func:`depthwise_pairs` pair whose tensor has a per-channel range in
    ``channel_absmax``, in place (before :func:`equalize`, which then leaves these pairs balanced)."""
    graph = model.graph
    done, gains = 0, []
    for first, second, name in depthwise_pairs(model):
        if name not in channel_absmax:
            continue
        s = activation_scales(channel_absmax[name])
        w1, b1 = _weights(first)
        w2, _ = _weights(second)
        new_w1, new_b1, new_w2 = apply_scales(w1, b1, w2, w2.shape[0], s)
        _set(graph, first, 1, new_w1, "act_eq_weight")
        if new_b1 is not None:
            _set(graph, first, 2, new_b1, "act_eq_bias")
        _set(graph, second, 1, new_w2, "act_eq_weight")
        done += 1
        gains.append(float(1 / s.min()))
    if not done:
        return []
    return [f"activation equalisation: {done} Conv -> depthwise Conv pair(s) rescaled from calibrated channel "
            f"ranges (largest channel gain {max(gains):.1f}x)"]
