"""The rotation pass (``--rotate``): QuaRot / SpinQuant R1 and R2 folded into the weights, offline.

Everything is found from the graph's structure, never from names:

- **norms**: SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization (onnxruntime-genai's builder),
  RMSNormalization (opset 23), the decomposed RMSNorm of torch and optimum exports
  (``x * 1/sqrt(mean(x^2) + eps)`` from Pow/Mul, ReduceMean, Add, Sqrt, Reciprocal/Div, then ``* gamma``),
  and LayerNormalization (which subtracts the mean);
- **the residual stream**: from the token embedding (graph/roles.py) forward through residual Adds, Casts
  and the norms' sum outputs; the other operand of each Add is a **writer** (a MatMul/Gemm with a constant
  weight, through a bias Add and layout ops, or a constant / another embedding table);
- **readers**: the MatMul/Gemm nodes fed by a norm's output (q/k/v, gate/up, the lm_head);
- **attention**: GroupQueryAttention (packed QKV or separate), or ``Softmax(...) @ V`` with V traced back to
  its projection (through Reshape/Transpose/Concat with the KV cache/Expand) and the product traced forward
  to the output projection.

R1 (one rotation of the hidden size) goes on the output side of the embedding tables and writers, on the
input side of every reader with the norm's scale folded in (the scale becomes 1). RMS norms commute with
it; a mean-subtracting LayerNorm does not, so on such graphs R1 is left off and the report says so.
R2 (one rotation of the head size per layer, the same for every head, so any grouping of query heads onto
KV heads is respected) goes on V's output columns and on the matching input rows of O. The KV cache's value
tensors are then in the rotated basis, which the same model reads back consistently.

Graph code here finds and rewires; the numbers come from ``onnxfgq.quant.rotation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.graph.roles import token_embedding
from onnxfgq.graph.rotate._attention import _attentions
from onnxfgq.graph.rotate._common import RotateError, _label, _op
from onnxfgq.graph.rotate._norms import Norm, find_norms
from onnxfgq.graph.rotate._stream import Edit, Found, _stream
from onnxfgq.graph.targets import constant_chain, unique_initializer_name
from onnxfgq.quant import rotation as rot


# ---------------------------------------------------------------------------------------- applying
def find(model: ir.Model, *, center: bool = False) -> Found:
    """What the pass would rotate (``center``: the stream's LayerNorms were already turned RMS norms by
    ``_to_rms_norms``, so writers and readers are centred)."""
    graph = model.graph
    found = Found(centered=center)
    emb = token_embedding(graph)
    norms = find_norms(graph)
    if emb is None:
        found.r1_problem = "no token embedding (a Gather of a constant table by an integer input)"
    else:
        found.hidden = int(constant_chain(emb.inputs[0]).array().shape[1])
        try:
            found.r1 = _stream(graph, emb.outputs[0], norms, found.hidden, found)
        except RotateError as exc:
            found.r1_problem = str(exc)
            found.r1 = []
    layer = 0
    for att in _attentions(graph):
        if isinstance(att, str):
            found.r2_skipped.append(att)
            continue
        consts, (o_node, o_idx), hd, cached = att
        found.cached = found.cached or cached
        k_o = int(constant_chain(o_node.inputs[o_idx]).array().shape[0])
        if hd <= 1 or k_o % hd or any((s[1] - s[0]) % hd for *_, s in consts):
            found.r2_skipped.append(f"{_label(o_node)}: head size {hd} does not divide V / O")
            continue
        layer += 1
        edits = [Edit(n, i, "head_out", layer, span=span, head=hd) for n, i, _, span in consts]
        edits.append(Edit(o_node, o_idx, "head_in", layer, head=hd))
        found.r2.append(edits)
        found.head_sizes.append(hd)
    return found


def _transform(a: np.ndarray, edit: Edit, rotations: dict[tuple[int, int], rot.Rotation], seed: int) -> np.ndarray:
    def r(n: int) -> np.ndarray:
        key = (edit.rotation, n)
        if key not in rotations:
            rotations[key] = rot.make_rotation(n, seed, edit.rotation)
        return rotations[key].matrix

    gamma = None if edit.gamma is None else np.asarray(edit.gamma)
    c = edit.center
    if edit.what == "in":
        return rot.rotate_input(a, r(a.shape[0]), gamma, center=c)
    if edit.what == "in_T":  # Gemm transB: the node holds W^T [N, K]
        return rot.rotate_input(a.T, r(a.shape[1]), gamma, center=c).T
    if edit.what == "out":
        return rot.rotate_output(a, r(a.shape[-1]), center=c)
    if edit.what == "out_T":
        return rot.rotate_output(a.T, r(a.shape[0]), center=c).T
    hd = edit.head
    if edit.what == "head_out":
        lo, hi = edit.span
        return rot.rotate_head_output(a, r(hd), lo, hi)
    if edit.what == "head_in":
        return rot.rotate_head_input(a, r(hd))
    raise ValueError(edit.what)


@dataclass
class Applied:
    notes: list[str] = field(default_factory=list)
    r1: bool = False
    r2_layers: int = 0


def _bias_slot(graph: ir.Graph, node: ir.Node, n: int, dtype: np.dtype) -> tuple[ir.Node, int]:
    """Where the bias of reader ``node`` (a MatMul/Gemm of width ``n``) is: Gemm's C, the constant of the
    one Add after it, or a zero bias Add inserted now."""
    if _op(node, "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        chain = constant_chain(node.inputs[2])
        if chain is not None and chain.array().size == n:
            return node, 2
    users = [u.node for u in node.outputs[0].uses() if not _op(u.node, "Shape", "Size")]
    if len(users) == 1 and _op(users[0], "Add"):
        add = users[0]
        for i, v in enumerate(add.inputs):
            chain = constant_chain(v)
            if chain is not None and chain.array().shape == (n,) and add.inputs[1 - i] is node.outputs[0]:
                return add, i
    out = node.outputs[0]
    name = unique_initializer_name(graph, f"{node.name or out.name}_rotate_bias")
    zeros = np.zeros(n, dtype)
    bias = ir.Value(name=name, shape=ir.Shape((n,)), type=ir.TensorType(ir.DataType.from_numpy(zeros.dtype)),
                    const_value=ir.tensor(zeros, name=name))
    graph.register_initializer(bias)
    add = ir.node("Add", [out, bias], name=name + "_Add")
    add.outputs[0].name = name + "_out"
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    uses = [(u.node, u.idx) for u in out.uses() if u.node is not add]
    graph.insert_after(node, add)
    for user, idx in uses:
        user.replace_input_with(idx, add.outputs[0])
    for i, g in enumerate(graph.outputs):
        if g is out:  # the graph output keeps its name
            graph.outputs[i] = add.outputs[0]
            old_name = out.name
            out.name = name + "_pre"
            add.outputs[0].name = old_name
    return add, 1


def _to_rms_norms(model: ir.Model, found: Found) -> dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]]:
    """Each LayerNormalization of a pre-LN stream becomes ``x / sqrt(mean(x^2) + eps) * gamma`` (equal once
    the stream is mean-free), its beta moved into the readers' biases; returns ``{slot: (node, input, beta W)}``
    for the biases to add it to."""
    graph = model.graph
    shifts: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
    opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
    for reader, index, transposed, beta in found.shifts:
        w = constant_chain(reader.inputs[index]).array()
        w = w.T if transposed else w
        slot_node, slot = _bias_slot(graph, reader, w.shape[1], w.dtype)
        shifts[(id(slot_node), slot)] = (slot_node, slot, rot.shifted_bias(None, np.asarray(beta), w))
    for norm in found.norms:
        ln = norm.output.producer()
        x, gamma = ln.inputs[0], ln.inputs[1]
        eps = ln.attributes.get_float("epsilon", 1e-5)
        dtype = constant_chain(gamma).array().dtype
        tag = unique_initializer_name(graph, (ln.name or "ln") + "_rms")

        def const(suffix: str, a: np.ndarray, tag: str = tag) -> ir.Value:
            v = ir.Value(name=f"{tag}_{suffix}", shape=ir.Shape(a.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(a.dtype)), const_value=ir.tensor(a))
            graph.register_initializer(v)
            return v

        sq = ir.node("Pow", [x, const("two", np.array(2, dtype))], name=f"{tag}_Pow")
        if opset >= 18:
            mean = ir.node("ReduceMean", [sq.outputs[0], const("axes", np.array([-1], np.int64))], name=f"{tag}_Mean")
        else:
            mean = ir.node("ReduceMean", [sq.outputs[0]], attributes={"axes": [-1]}, name=f"{tag}_Mean")
        add = ir.node("Add", [mean.outputs[0], const("eps", np.array(eps, dtype))], name=f"{tag}_Add")
        root = ir.node("Sqrt", [add.outputs[0]], name=f"{tag}_Sqrt")
        div = ir.node("Div", [x, root.outputs[0]], name=f"{tag}_Div")
        mul = ir.node("Mul", [div.outputs[0], gamma], name=f"{tag}_Scale")
        nodes = [sq, mean, add, root, div, mul]
        for i, n in enumerate(nodes):
            n.outputs[0].name = f"{tag}_{i}"
        out = norm.output
        mul.outputs[0].type, mul.outputs[0].shape = out.type, out.shape
        graph.insert_before(ln, nodes)
        for user, idx in [(u.node, u.idx) for u in out.uses()]:
            user.replace_input_with(idx, mul.outputs[0])
        graph.remove(ln, safe=True)
    return shifts


def apply(model: ir.Model, seed: int = 0, *, r1: bool = True, r2: bool = True) -> Applied:
    """Rotate ``model`` in place (float function unchanged); returns the report's notes."""
    graph = model.graph
    found = find(model)
    result = Applied()
    shifts: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
    layer_norms = 0
    if r1 and found.r1_problem is None and found.centered:
        layer_norms = len(found.norms)
        shifts = _to_rms_norms(model, found)
        found = find(model, center=True)
    edits: dict[tuple[int, int], list[Edit]] = {}
    order: list[tuple[ir.Node, int]] = []

    def queue(e: Edit) -> None:
        key = (id(e.node), e.index)
        if key not in edits:
            edits[key] = []
            order.append((e.node, e.index))
        edits[key].append(e)

    use_r1 = r1 and found.r1_problem is None and bool(found.r1)
    if use_r1:
        for e in found.r1:
            queue(e)
    for key, (node, index, _) in shifts.items():  # reader biases that take a LayerNorm's beta
        if key not in edits:
            edits[key] = []
            order.append((node, index))
    if r2:
        for group in found.r2:
            for e in group:
                queue(e)
    rotations: dict[tuple[int, int], rot.Rotation] = {}
    made: dict[tuple, ir.Value] = {}
    by_root: dict[int, list[np.ndarray]] = {}
    untied = ""
    for node, index in order:
        value = node.inputs[index]
        chain = constant_chain(value)
        todo = edits[(id(node), index)]
        shift = shifts.get((id(node), index))
        key = (chain.key, tuple(e.spec for e in todo), id(node) if shift is not None else None)
        if key not in made:
            a = chain.array()
            if shift is not None:  # beta W first: R2 may rotate this bias next
                a = (a + shift[2]).astype(a.dtype)
            for e in todo:
                a = _transform(a, e, rotations, seed)
            for other in by_root.get(id(chain.root), []):  # a tied table and lm_head stay tied (one storage)
                if rot.transposed_equal(a, other):
                    a = np.ascontiguousarray(other.T)
            by_root.setdefault(id(chain.root), []).append(a)
            name = unique_initializer_name(graph, (chain.root.name or "w") + "_rot")
            new = ir.Value(name=name, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                           const_value=ir.tensor(a, name=name))
            graph.register_initializer(new)
            made[key] = new
        if any(k[0][0] == chain.key[0] and k != key for k in made) and not any(
                rot.transposed_equal(a, b) for a in by_root[id(chain.root)] for b in by_root[id(chain.root)] if a is not b):
            untied = untied or chain.root.name or "a constant"
        node.replace_input_with(index, made[key])
    if use_r1:
        for norm in found.norms:
            if norm.gamma_slot is None:
                continue
            node, i = norm.gamma_slot
            g = constant_chain(node.inputs[i]).array()
            name = unique_initializer_name(graph, f"rotate_unit_scale_{g.shape[0]}_{g.dtype}")
            ones = ir.Value(name=name, shape=ir.Shape(g.shape), type=ir.TensorType(ir.DataType.from_numpy(g.dtype)),
                            const_value=ir.tensor(rot.ones_like(g), name=name))
            graph.register_initializer(ones)
            node.replace_input_with(i, ones)
        c = found.counts
        kinds = sorted({rotations[k].kind for k in rotations if k[0] == 0})
        result.r1 = True
        if layer_norms:
            result.notes.append(
                f"rotate: {layer_norms} pre-LN LayerNormalizations made RMS norms over a mean-free stream (writers "
                f"and embedding tables centred; their beta folded into {len(shifts)} reader biases): exact")
        result.notes.append(
            f"rotate (seed {seed}): R1 {'/'.join(kinds)} of size {found.hidden} on the residual stream: the "
            f"embedding, {c['writers']} writers (output side), {c['readers']} readers (input side, the scales of "
            f"{c['norms']} norms folded in: {', '.join(sorted({n.kind for n in found.norms}))})"
            + (f"; {untied!r}, shared by differently rotated nodes, was copied (untied)" if untied else ""))
    elif r1:
        result.notes.append(f"rotate (seed {seed}): R1 not applied: {found.r1_problem or 'no residual stream found'}")
    if r2 and found.r2:
        sizes = sorted(set(found.head_sizes))
        kinds = sorted({rotations[k].kind for k in rotations if k[0] != 0})
        result.r2_layers = len(found.r2)
        result.notes.append(
            f"rotate: R2 {'/'.join(kinds)} of head size {'/'.join(map(str, sizes))} on {len(found.r2)} attention "
            f"V/O pairs (one per layer, every head{'; the KV cache holds rotated values' if found.cached else ''})")
    if r2 and found.r2_skipped:
        result.notes.append(f"rotate: R2 left off {len(found.r2_skipped)} attention(s): {found.r2_skipped[0]}")
    if r2 and not found.r2 and not found.r2_skipped:
        result.notes.append("rotate: R2 not applied: no attention (Softmax @ V or GroupQueryAttention) found")
    return result


__all__ = ["Applied", "Found", "Norm", "RotateError", "apply", "find", "find_norms"]
