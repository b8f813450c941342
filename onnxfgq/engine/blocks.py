"""Cut a graph into a chain of blocks at the tensors the whole computation flows through.

Every value gets a kind, propagated in graph (topological) order:

- ``const``: computed from initializers only (a transposed tied embedding, say);
- ``side``: computed from graph inputs and constants without any weighted op (attention masks,
  position ids, rotary tables): cheap, so every block that reads one recomputes it;
- ``shape``: depends on the stream only through ``Shape``/``Size`` (a mask sized from the hidden
  state): handed from block to block like the stream, but not part of it;
- ``table``: looked up in a large float table (token embeddings, a rotary cache) from side values;
- ``stream``: downstream of a weighted op (a node with a float constant matrix input of at least
  ``MIN_WEIGHT`` elements that is not a table lookup).

In graph order, a boundary between two nodes is a cut when the ``table``/``stream`` values produced
before it and read after it all come from one node (usually one tensor): every path of the
computation passes through that node (the residual stream between decoder layers and between their
attention and MLP halves, a fused skip-add + norm with its two outputs, the activation between two
CNN stages). Found from the structure alone; no names. When no boundary qualifies because
a looked-up table (a rotary cache gathered once, read by every layer) crosses them all, ``table``
values are handed along like ``shape`` ones and only ``stream`` values count. A graph without any
cut is one block.

Block ``b`` computes, from its cut tensor (and the ``shape`` values and graph inputs it reads), the
next cut tensor and the graph outputs produced on the way. Each block is a standalone ``ir.Model``
sharing the original's tensors (nothing is copied or loaded here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import extract

MIN_WEIGHT = 1024  # elements of a matrix: smaller constants and vectors (biases, norms' scales) do not start the stream
LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND", "GatherBlockQuantized"})
SHAPE_OPS = frozenset({"Shape", "Size"})
CONST, SIDE, SHAPE, TABLE, STREAM = 0, 1, 2, 3, 4
KIND_NAMES = ("const", "side", "shape", "table", "stream")


@dataclass
class Block:
    """One link of the chain: a standalone model and the names it reads and writes."""

    index: int
    model: ir.Model
    inputs: list[str]  # graph inputs of the original model first, then cached values
    outputs: list[str]  # values later blocks read, then the original's graph outputs made here
    cut_in: list[str]  # the cut tensors it starts from (none for the first block)

    @property
    def nodes(self) -> int:
        return len(self.model.graph)

    def weight_bytes(self) -> int:
        return sum(v.const_value.nbytes for v in self.model.graph.initializers.values()
                   if v.const_value is not None)


@dataclass
class Chain:
    blocks: list[Block]
    graph_inputs: list[str]  # the original model's inputs
    graph_outputs: list[str]
    note: str  # how the graph was cut, for the report

    def __len__(self) -> int:
        return len(self.blocks)


# ---------------------------------------------------------------------------------------- kinds
def _outer_inputs(node: ir.Node) -> Iterable[ir.Value]:
    """The node's inputs, and the outer-scope values its subgraphs read (If/Loop/Scan bodies)."""
    yield from (v for v in node.inputs if v is not None)
    for attr in node.attributes.values():
        graphs = ([attr.as_graph()] if attr.type == ir.AttributeType.GRAPH
                  else attr.as_graphs() if attr.type == ir.AttributeType.GRAPHS else [])
        for g in graphs:
            for inner in ir.traversal.RecursiveGraphIterator(g):
                for v in inner.inputs:
                    if v is not None and v.graph is node.graph:
                        yield v


def _constant(value: ir.Value) -> ir.TensorProtocol | None:
    if value.const_value is not None and value.producer() is None:
        return value.const_value
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        return attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
    return None


def _has_weight(node: ir.Node) -> bool:
    for v in node.inputs:
        if v is None:
            continue
        t = _constant(v)
        if t is None or not t.dtype.is_floating_point():
            continue
        dims = [d for d in t.shape.numpy() if d > 1]
        if len(dims) >= 2 and int(np.prod(dims)) >= MIN_WEIGHT:  # a matrix or kernel, not a norm's scale
            return True
    return False


def _is_weighted(node: ir.Node) -> bool:
    return node.op_type not in LOOKUPS and _has_weight(node)


def value_kinds(graph: ir.Graph) -> dict[ir.Value, int]:
    kinds: dict[ir.Value, int] = {v: SIDE for v in graph.inputs}
    for v in graph.initializers.values():
        kinds.setdefault(v, CONST)
    for node in graph:
        ins = [kinds.get(v, CONST) for v in _outer_inputs(node)]
        kind = max(ins, default=CONST)
        if node.op_type in SHAPE_OPS and kind >= TABLE:
            kind = SHAPE
        elif node.op_type in LOOKUPS and _has_weight(node):
            kind = max(kind, TABLE)
        elif _has_weight(node):
            kind = STREAM
        for out in node.outputs:
            kinds[out] = kind
    return kinds


# ---------------------------------------------------------------------------------------- cuts
def find_cuts(graph: ir.Graph, kinds: dict[ir.Value, int], counted: frozenset[int]
              ) -> list[tuple[tuple[ir.Value, ...], int]]:
    """The cuts in graph order: the tensors crossing each, and the index of the last node before it."""
    nodes = list(graph)
    last_use: dict[ir.Value, int] = {}
    for i, node in enumerate(nodes):
        for v in _outer_inputs(node):
            last_use[v] = i
    live: set[ir.Value] = set()
    cuts: list[tuple[tuple[ir.Value, ...], int]] = []
    heavy_since_cut = False
    for i, node in enumerate(nodes[:-1]):
        heavy_since_cut |= _is_weighted(node)
        live.update(o for o in node.outputs if kinds[o] in counted and last_use.get(o, -1) > i)
        live = {v for v in live if last_use[v] > i}
        if live and heavy_since_cut and len({v.producer() for v in live}) == 1:
            values = tuple(sorted(live, key=lambda v: v.producer().outputs.index(v)))
            if not cuts or set(cuts[-1][0]) != live:
                cuts.append((values, i))
                heavy_since_cut = False
    # The last block must hold a weight too.
    while cuts and not _weighted_after(nodes, cuts[-1][1]):
        cuts.pop()
    return cuts


def _weighted_after(nodes: Sequence[ir.Node], i: int) -> bool:
    return any(_is_weighted(n) for n in nodes[i + 1:])


def _backward(outputs: Iterable[ir.Value], stop: set[ir.Value]) -> tuple[set[ir.Node], set[ir.Value]]:
    """Nodes needed to compute ``outputs`` from ``stop`` (and graph inputs/initializers), and the
    non-initializer values they read from outside (the block's inputs)."""
    nodes: set[ir.Node] = set()
    frontier: set[ir.Value] = set()
    todo = [v for v in outputs]
    seen: set[ir.Value] = set()
    while todo:
        v = todo.pop()
        if v in seen:
            continue
        seen.add(v)
        node = v.producer()
        if v in stop or node is None:
            if not v.is_initializer():
                frontier.add(v)
            continue
        if node not in nodes:
            nodes.add(node)
            todo.extend(_outer_inputs(node))
    return nodes, frontier


def _inferred_types(model: ir.Model) -> dict[str, tuple[ir.TypeProtocol, ir.Shape | None]]:
    """Type and shape of every value, from onnx shape inference on a copy (where it succeeds)."""
    import logging

    from onnx_ir.passes import common

    copy = model.clone()
    logger = logging.getLogger(common.ShapeInferencePass.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        common.ShapeInferencePass()(copy)
    except Exception:  # noqa: BLE001, S110 - types are then taken from the values as they are
        pass
    finally:
        logger.setLevel(level)
    return {v.name: (v.type, v.shape) for node in copy.graph for v in node.outputs if v.type is not None}


def partition(model: ir.Model, *, max_blocks: int = 0) -> Chain:
    """The model's chain of blocks (one block when the graph has no cut). ``max_blocks`` > 0 keeps
    evenly spaced cuts so that there are at most that many blocks."""
    graph = model.graph
    kinds = value_kinds(graph)
    handed_kinds = {SHAPE}
    cuts = find_cuts(graph, kinds, frozenset({TABLE, STREAM}))
    if not cuts:
        cuts = find_cuts(graph, kinds, frozenset({STREAM}))
        handed_kinds.add(TABLE)
    if max_blocks > 0 and len(cuts) + 1 > max_blocks:
        step = (len(cuts) + 1) / max_blocks
        cuts = [cuts[round(step * (j + 1)) - 1] for j in range(max_blocks - 1)]
    position = {n: i for i, n in enumerate(graph)}
    edges = [i for _, i in cuts] + [len(position)]  # block b holds the nodes up to edges[b]

    def block_of(v: ir.Value) -> int:
        i = position[v.producer()]
        return next(b for b, e in enumerate(edges) if i <= e)

    # Values handed between blocks: the cut tensors and the "shape" values read across a cut.
    handed = {v for c, _ in cuts for v in c} | {v for v, k in kinds.items() if k in handed_kinds}
    produced_in = {v: block_of(v) for v in handed}
    made: list[list[ir.Value]] = [list(c) for c, _ in cuts] + [[]]  # values later blocks read
    finals: list[list[ir.Value]] = [[] for _ in edges]  # the original's outputs made by each block
    for v in graph.outputs:
        if v.producer() is None:
            raise ValueError(f"graph output {v.name!r} is not computed by a node")
        finals[block_of(v)].append(v)

    def stop(b: int) -> set[ir.Value]:
        return set(graph.inputs) | {v for v in handed if produced_in[v] < b}

    # From the last block back: what a block reads from earlier ones becomes their output.
    frontiers: list[set[ir.Value]] = [set() for _ in edges]
    for b in reversed(range(len(edges))):
        _, frontiers[b] = _backward(made[b] + finals[b], stop(b))
        for v in sorted(frontiers[b] - set(graph.inputs), key=lambda v: position[v.producer()]):
            if v not in made[produced_in[v]]:
                made[produced_in[v]].append(v)
    types = _inferred_types(model)
    blocks = []
    for b in range(len(edges)):
        ins = [v for v in graph.inputs if v in frontiers[b]] + sorted(
            frontiers[b] - set(graph.inputs), key=lambda v: position[v.producer()])
        outs = made[b] + finals[b]
        sub = extract(graph, ins, outs)
        sub.name = f"{graph.name or 'graph'}_block{b}"
        sub.opset_imports.update(graph.opset_imports)
        for v in [*sub.inputs, *sub.outputs]:  # onnxruntime wants the type of every graph input
            if v.type is None and v.name in types:
                v.type, v.shape = types[v.name]
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
        block_model = ir.Model(sub, ir_version=model.ir_version, producer_name="onnxfgq-blocks",
                               functions=list(model.functions.values()))
        blocks.append(Block(b, block_model, [v.name for v in ins], [v.name for v in outs],
                            [v.name for v in cuts[b - 1][0]] if b else []))
    note = (f"cut into {len(blocks)} blocks at {len(cuts)} points of the stream" if cuts
            else "no cut found: one block")
    return Chain(blocks, [v.name for v in graph.inputs], [v.name for v in graph.outputs], note)
