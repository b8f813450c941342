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

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.graph.roles import token_embedding
from onnxfgq.graph.targets import constant_chain, unique_initializer_name
from onnxfgq.quant import rotation as rot

_DEFAULT = ("", "ai.onnx")
_MS = ("com.microsoft",)
_SAME = ("Cast", "Identity")  # stream-preserving
_LAYOUT = ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")


class RotateError(ValueError):
    """Why a rotation cannot be applied to this graph (the report names the node)."""


class _GraphOutput(RotateError):
    """A value the rotation would change is a graph output."""


def _op(node: ir.Node | None, *ops: str, domains: tuple[str, ...] = _DEFAULT) -> bool:
    return node is not None and node.op_type in ops and node.domain in domains


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or node.outputs[0].name!r}"


def _scalar(value: ir.Value | None) -> float | None:
    chain = constant_chain(value)
    if chain is None:
        return None
    a = chain.array()
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _last_axis_only(node: ir.Node) -> bool:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        chain = constant_chain(node.inputs[1])
        axes = None if chain is None else [int(a) for a in chain.array().reshape(-1)]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)) \
        and node.attributes.get_int("keepdims", 1) == 1


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


# ---------------------------------------------------------------------------------- the edit list
@dataclass(frozen=True)
class Edit:
    """One transform of one constant input: ``node.inputs[index]`` becomes f(that array)."""

    node: ir.Node
    index: int
    what: str  # "in" (R1 rows, gamma folded), "out" (R1 last axis), "head_out" (R2 columns), "head_in" (R2 rows)
    rotation: int  # stream id: 0 = R1, i + 1 = layer i's R2
    gamma: tuple[float, ...] | None = None
    span: tuple[int, int] | None = None  # head_out: the V columns
    head: int = 0  # R2: the head size
    center: bool = False  # R1 over a LayerNorm stream: writers' outputs (and readers' inputs) mean-free

    @property
    def spec(self) -> tuple:
        """What is done, whatever the node (equal specs on one tensor give one rotated copy)."""
        return (self.what, self.rotation, self.gamma, self.span, self.head, self.center)


@dataclass
class Found:
    hidden: int = 0
    norms: list[Norm] = field(default_factory=list)
    r1: list[Edit] = field(default_factory=list)
    r1_problem: str | None = None
    r2: list[list[Edit]] = field(default_factory=list)  # per attention
    head_sizes: list[int] = field(default_factory=list)
    r2_skipped: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    cached: bool = False  # some rotated V reaches a KV cache output
    centered: bool = False  # pre-LN LayerNorm stream: made mean-free, the norms become RMS norms
    shifts: list[tuple[ir.Node, int, bool, tuple[float, ...]]] = field(default_factory=list)  # readers, beta


def _matmul_weight(node: ir.Node) -> tuple[int, bool] | None:
    """(input index of the constant weight, transposed) for a MatMul/Gemm node, or None."""
    if _op(node, "MatMul") and constant_chain(node.inputs[1]) is not None:
        return 1, False
    if _op(node, "Gemm") and constant_chain(node.inputs[1]) is not None and not node.attributes.get_int("transA", 0):
        return 1, bool(node.attributes.get_int("transB", 0))
    return None


def _writer(user: ir.Node, slot: int, hidden: int) -> list[tuple[ir.Node, int, str]]:
    """What produces ``user.inputs[slot]`` (an operand joining the stream): [(node, input index, kind)] of
    the constants to rotate on their last axis (a projection's weight and bias, a table, a constant such as
    folded position embeddings); raises RotateError for anything else."""
    edits: list[tuple[ir.Node, int, str]] = []
    value = start = user.inputs[slot]
    for _ in range(16):
        chain = constant_chain(value)
        if chain is not None:
            if value is not start or int(chain.array().shape[-1] if chain.array().ndim else 0) != hidden:
                raise RotateError(f"a constant {value.name!r} joins the residual stream")
            return [(user, slot, "const")]
        node = value.producer()
        if node is None:
            raise RotateError(f"graph input {value.name!r} joins the residual stream")
        if _op(node, *_LAYOUT):
            value = node.inputs[0]
            continue
        if _op(node, "Add"):
            consts = [i for i, v in enumerate(node.inputs) if constant_chain(v) is not None]
            if len(consts) == 1:  # a bias
                edits.append((node, consts[0], "bias"))
                value = node.inputs[1 - consts[0]]
                continue
        if _op(node, "Mul") and any(_scalar(v) is not None for v in node.inputs):
            value = next(v for v in node.inputs if _scalar(v) is None)  # a scalar scale commutes
            continue
        w = _matmul_weight(node)
        if w is not None:
            edits.append((node, w[0], "weight_T" if w[1] else "weight"))
            if _op(node, "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
                edits.append((node, 2, "bias"))
            return edits
        if _op(node, "Gather") and node.attributes.get_int("axis", 0) == 0 and constant_chain(node.inputs[0]):
            edits.append((node, 0, "table"))
            return edits
        raise RotateError(f"{_label(node)} writes to the residual stream (from {start.name!r}) and is not a "
                          f"projection with a constant weight")
    raise RotateError(f"{start.name!r}: no projection found within 16 ops")


def _stream(graph: ir.Graph, start: ir.Value, norms: list[Norm], hidden: int, found: Found) -> list[Edit]:
    member = {}
    for n in norms:
        for i in n.members:
            member[i] = n
    outputs = {id(v) for v in graph.outputs}
    stream: dict[int, ir.Value] = {id(start): start}
    queue = [start]
    used: dict[int, Norm] = {}
    joins: list[tuple[ir.Node, int]] = []  # (node, input) of the non-stream operands of residual Adds / Skip norms
    while queue:
        v = queue.pop()
        if id(v) in outputs:
            raise RotateError(f"the residual stream {v.name!r} is a graph output")
        for use in v.uses():
            node = use.node
            nxt: list[ir.Value] = []
            if id(node) in member:
                norm = member[id(node)]
                used[id(norm)] = norm
                if len(norm.inputs) > 1:
                    joins += [(node, i) for i, x in enumerate(norm.inputs) if x is not v]
                if norm.stream_output is not None:
                    nxt.append(norm.stream_output)
            elif _op(node, "Shape", "Size"):
                continue
            elif _op(node, *_SAME) or (_op(node, "Reshape") and _keeps_last(node, hidden, stream)):
                nxt.append(node.outputs[0])
            elif _op(node, "Add"):
                joins += [(node, i) for i, x in enumerate(node.inputs) if x is not v]
                nxt.append(node.outputs[0])
            else:
                raise RotateError(f"the residual stream {v.name!r} is read by {_label(node)}, which a rotation "
                                  f"does not pass through")
            for o in nxt:
                if id(o) not in stream:
                    stream[id(o)] = o
                    queue.append(o)
    found.norms = list(used.values())
    bad = [n for n in found.norms if n.mean_subtracting]
    if bad:
        # Pre-LN (every norm reads the stream, the stream never passes through one): exact when the
        # stream is made mean-free (writers' outputs centred) and each LayerNorm becomes an RMS norm.
        problem = _centering_problem(found.norms)
        if problem:
            raise RotateError(f"{bad[0].label} subtracts the mean, which does not commute with a rotation of "
                              f"the stream, and {problem}")
        found.centered = True
    edits: list[Edit] = []
    seen: set[tuple[int, int]] = set()
    center = found.centered

    def add(node: ir.Node, index: int, what: str, gamma=None) -> None:
        if (id(node), index) not in seen:
            seen.add((id(node), index))
            edits.append(Edit(node, index, what, 0, gamma=gamma, center=center))

    emb = start.producer()
    add(emb, 0, "out")
    writers = 0
    for user, slot in joins:
        if id(user.inputs[slot]) in stream:
            continue
        for node, index, kind in _writer(user, slot, hidden):
            add(node, index, "out" if kind != "weight_T" else "out_T")
            writers += kind.startswith("weight")
    readers = 0
    for norm in found.norms:
        g = norm.gamma()
        if g is None and norm.gamma_slot is not None:
            raise RotateError(f"{norm.label}: its scale is not a constant")
        if g is not None and g.shape != (hidden,):
            raise RotateError(f"{norm.label}: scale of shape {g.shape}, not ({hidden},)")
        gamma = None if g is None else tuple(float(x) for x in g)
        beta = norm.beta_values() if norm.beta else None
        try:
            read = list(_readers(norm.output))
        except _GraphOutput:
            raise
        except RotateError:
            if norm.mean_subtracting:
                raise RotateError(f"{norm.label} subtracts the mean and its output is the residual stream "
                                  f"(post-LN): a rotation does not commute with it") from None
            raise
        for node, index, transposed in read:
            add(node, index, "in_T" if transposed else "in", gamma)
            if beta is not None and any(beta):
                found.shifts.append((node, index, transposed, beta))
            readers += 1
    found.counts.update(writers=writers, readers=readers, norms=len(found.norms))
    return edits


def _centering_problem(norms: list[Norm]) -> str | None:
    """Why the LayerNorms of a stream cannot all become RMS norms over a mean-free stream, or None."""
    for n in norms:
        if n.kind != "LayerNormalization":
            return f"{n.label} is not a plain LayerNormalization"
        if not n.mean_subtracting:
            return f"{n.label} (an RMS norm) sits on the same stream"
        node = n.output.producer()
        if node.attributes.get_int("axis", -1) != -1 and not (
                node.inputs[0].shape is not None and node.attributes.get_int("axis", -1) == len(node.inputs[0].shape) - 1):
            return f"{n.label} does not normalize the last axis only"
        if any(o.uses() for o in node.outputs[1:]):
            return f"{n.label}'s mean or inverse deviation is used"
    return None


def _shape_entry(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(x, i) when ``value`` is ``Shape(x)[i]`` (through Unsqueeze/Squeeze/Cast)."""
    pick = _through(value, ("Unsqueeze", "Squeeze", "Cast", "Identity")).producer()
    if not _op(pick, "Gather") or not _op(pick.inputs[0].producer(), "Shape"):
        return None
    index = _scalar(pick.inputs[1])
    return None if index is None else (pick.inputs[0].producer().inputs[0], int(index))


def _keeps_last(node: ir.Node, hidden: int, stream: dict | None = None) -> bool:
    """A Reshape that keeps the last axis (OPT flattens [b, s, d] to [b*s, d]): its target shape ends in
    the hidden size (a constant, a static output shape), or in the input's own last dimension
    (``Concat(..., Unsqueeze(Squeeze(Slice(Shape(x), -1))))``, or a Gather of the last entry of the
    shape of ``x`` or of another stream value)."""
    chain = constant_chain(node.inputs[1])
    if chain is not None:
        return chain.array().size > 0 and int(chain.array().reshape(-1)[-1]) == hidden
    if _last_dim(node.outputs[0]) == hidden:
        return True
    cat = node.inputs[1].producer()
    if not _op(cat, "Concat"):
        return False
    v = _through(cat.inputs[-1], ("Unsqueeze", "Squeeze", "Cast", "Identity"))
    pick = v.producer()
    if _op(pick, "Slice") and _scalar(pick.inputs[1]) == -1 and (len(pick.inputs) < 3 or
                                                                  (_scalar(pick.inputs[2]) or 0) >= 2 ** 31 - 1):
        shape = pick.inputs[0].producer()
    elif _op(pick, "Gather"):
        shape = pick.inputs[0].producer()
        if not _op(shape, "Shape"):
            return False
        src, index = shape.inputs[0], _scalar(pick.inputs[1])
        if not (src is node.inputs[0] or (stream is not None and id(src) in stream)):
            return False
        rank = len(src.shape) if src.shape is not None else None
        if index == -1 or (rank is not None and index == rank - 1):
            return True
        return all(_shape_entry(v) == (src, k) for k, v in enumerate(cat.inputs))  # src's shape, whole
    else:
        return False
    return _op(shape, "Shape") and shape.inputs[0] is node.inputs[0]


def _readers(value: ir.Value) -> Iterator[tuple[ir.Node, int, bool]]:
    if value.is_graph_output():
        raise _GraphOutput(f"the normalized {value.name!r} is a graph output (it would come out rotated)")
    for use in value.uses():
        node = use.node
        if _op(node, *_SAME) or (_op(node, "Reshape") and _keeps_last(node, int(value.shape[-1])
                                                                         if _last_dim(value) else -1)):
            yield from _readers(node.outputs[0])
            continue
        if _op(node, "Shape", "Size"):
            continue
        w = _matmul_weight(node)
        if w is None or use.idx != 0:
            raise RotateError(f"the normalized {value.name!r} is read by {_label(node)}, not only by projections "
                              f"with a constant weight")
        yield node, w[0], w[1]


# -------------------------------------------------------------------------------------- attention
def _single_use(value: ir.Value) -> ir.Node | None:
    uses = [u.node for u in value.uses() if not _op(u.node, "Shape", "Size")]
    return uses[0] if len(uses) == 1 else None


def _o_proj(value: ir.Value) -> tuple[ir.Node, int] | None:
    """The output projection fed (through Transpose/Reshape keeping the head size last) by ``value``."""
    for _ in range(8):
        node = _single_use(value)
        if node is None:
            return None
        if _op(node, "Transpose"):
            perm = node.attributes.get_ints("perm", None)
            if perm is None or perm[-1] != len(perm) - 1:
                return None
        elif not _op(node, "Reshape", "Cast", "Identity"):
            w = _matmul_weight(node)
            return (node, w[0]) if w is not None and not w[1] and node.inputs[0] is value else None
        value = node.outputs[0]
    return None


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return int(value.shape[-1])
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
            perm = node.attributes.get_ints("perm", None)
            if perm is None or perm[-1] != len(perm) - 1:
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
