"""The residual stream: its writers and readers, as a list of edits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx_ir as ir

from onnxfgq.graph.rotate._common import (
    _LAYOUT,
    _SAME,
    RotateError,
    _GraphOutput,
    _label,
    _last_dim,
    _op,
    _scalar,
)
from onnxfgq.graph.rotate._norms import Norm, _through
from onnxfgq.graph.targets import constant_chain


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
