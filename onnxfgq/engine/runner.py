"""Block-by-block calibrated quantization: memory bounded by one block.

The calibration feeds are written to a cache folder once. Then, block after block (see blocks.py):

1. the block alone runs in an onnxruntime session over its cached inputs, and the inputs of its
   MatMul/Gemm weights stream into ``ActivationStats`` (padding tokens left out, as in
   ``calibrated.collect_stats``); AWQ scales are searched there when asked;
2. its weights are solved (``Plan.solve``, called by the rewriter in graph order);
3. before the first weight of the next block is solved, the block's outputs become the next block's
   cached inputs: by default the block as it is (float weights), so every weight's statistics are the
   whole-model path's; with ``--sequential`` (GPTQ's sequential mode) the block runs again with every
   weight replaced by the float weight its quantized form computes, so each block is calibrated on what
   the quantized blocks before it produce. Either way nothing but one block's session, statistics and
   one batch of activations is in memory at a time. (Sequential is not the default: on the test LLM it
   measured behind the float inputs; docs/BENCHMARKS.md.)

With ``--gptaq`` (asymmetric calibration) the float model's path is kept beside it: each block also
runs with its float weights on the float path's cached inputs (``FLOAT``-prefixed cache entries), and
each weight's statistics pair the quantized path's inputs with the float path's (``PairedStats``), so
GPTQ can aim at the float model's output. A block's weights are then solved in stages: those that no
other weight of the block feeds first, the rest observed with them quantized (``_collect``).

``plan_blockwise`` returns a ``calibrated.Plan`` whose ``engine`` hook does steps 1 and 3.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.gptaq import PairedStats
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.config import WeightConfig
from onnxfgq.engine.blocks import Block, Chain, partition
from onnxfgq.engine.executors import WeightRef
from onnxfgq.graph.targets import Target

Progress = Callable[[Iterable, int, str], Iterable]
SOLVE_COLUMNS = 1024  # output columns solved at once (ColumnChunks), in parallel
FLOAT = "onnxfgq_float::"  # cache prefix of the float path's tensors (--gptaq)


# ---------------------------------------------------------------------------------------- sessions
def session(model: ir.Model):
    """An onnxruntime CPU session over ``model`` (basic optimisations only: fusions could swallow the
    tensors observed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:  # the one mechanism that reads external data from the model's own files
        from onnxfgq.graph.external import session as external_session
    except ImportError:
        external_session = None
    if external_session is not None:
        return external_session(model, so)
    with tempfile.TemporaryDirectory(prefix="onnxfgq-block-") as tmp:
        path = Path(tmp) / "block.onnx"
        ir.save(model, path, external_data="block.onnx.data", size_threshold_bytes=1 << 20)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _with_outputs(block: Block, names: Sequence[str], weights: dict[str, np.ndarray] | None = None
                  ) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A copy of the block whose outputs also include ``names`` (tensors computed inside it), with
    ``weights`` in place of its own (``_with_weights``), and the feed that gives those weights."""
    copy, feed = _with_weights(block, weights) if weights else (block.model.clone(), {})
    values = {v.name: v for node in copy.graph for v in node.outputs}
    have = {v.name for v in copy.graph.outputs}
    for name in names:
        if name not in have:
            v = values[name]
            if v.type is None:
                v.type = ir.TensorType(ir.DataType.FLOAT)
            copy.graph.outputs.append(v)
    return copy, feed


def _with_weights(block: Block, weights: dict[str, np.ndarray]) -> tuple[ir.Model, dict[str, np.ndarray]]:
    """A copy of the block where the node producing output ``name`` reads ``weights[name]`` (oriented
    as the node sees it) as its weight input instead of its own, and the feed that gives them.

    The weights are graph inputs, not initializers: onnxruntime reads the caller's arrays at each run,
    where initializers would be serialised into the model proto and copied by onnxruntime again (three
    copies of a 7B MLP block's 540 MB, and seconds of session creation per block)."""
    copy = block.model.clone()
    feed: dict[str, np.ndarray] = {}
    for node in copy.graph:
        w = weights.get(node.outputs[0].name) if node.outputs else None
        if w is None:
            continue
        name = f"{node.outputs[0].name}::onnxfgq_effective"
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(w.dtype)), shape=ir.Shape(w.shape))
        copy.graph.inputs.append(value)
        old = node.inputs[1]
        node.replace_input_with(1, value)
        if old is not None and old.is_initializer() and not old.uses() and not old.is_graph_output():
            copy.graph.initializers.pop(old.name)  # not read from the original file either
        feed[name] = w
    return copy, feed


def _upstream_of_weights(block: Block, names: Sequence[str], weight_outputs: set[str]) -> set[str]:
    """The tensors of ``names`` that no node in ``weight_outputs`` (the block's weighted nodes) feeds,
    directly or through other nodes of the block."""
    producer = {v.name: node for node in block.model.graph for v in node.outputs}
    fed: dict[str, bool] = {}

    def downstream(name: str) -> bool:  # iterative: blocks can be deep
        stack = [name]
        while stack:
            n = stack[-1]
            node = producer.get(n)
            if n in fed or node is None:
                fed.setdefault(n, False)
                stack.pop()
                continue
            ins = [v.name for v in node.inputs if v is not None and v.name]
            todo = [i for i in ins if i not in fed]
            if todo:
                stack.extend(todo)
                continue
            fed[n] = any(o.name in weight_outputs for o in node.outputs) or any(fed[i] for i in ins)
            stack.pop()
        return fed[name]

    return {n for n in names if not downstream(n)}


def run_chain(chain: Chain, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model's outputs, computed block after block (each block in its own session)."""
    values = dict(feed)
    for block in chain.blocks:
        outs = session(block.model).run(block.outputs, {n: values[n] for n in block.inputs})
        values.update(zip(block.outputs, outs))
    return {n: values[n] for n in chain.graph_outputs}


# ---------------------------------------------------------------------------------------- cache
class ActivationCache:
    """One ``.npy`` file per (tensor, batch) in ``folder``, read back memory-mapped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.ids: dict[str, int] = {}
        self.batches = 0

    def _path(self, name: str, batch: int) -> Path:
        i = self.ids.setdefault(name, len(self.ids))
        return self.folder / f"t{i}" / f"{batch}.npy"

    def put(self, name: str, batch: int, x: np.ndarray) -> None:
        path = self._path(name, batch)
        path.parent.mkdir(exist_ok=True)
        np.save(path, x)

    def get(self, name: str, batch: int) -> np.ndarray:
        return np.load(self._path(name, batch), mmap_mode="r")

    def drop(self, name: str) -> None:
        if name in self.ids:
            shutil.rmtree(self.folder / f"t{self.ids[name]}", ignore_errors=True)


# ---------------------------------------------------------------------------------------- engine
def _observe(st: ActivationStats, x: np.ndarray, mask: np.ndarray | None, x_float: np.ndarray | None = None) -> None:
    """As ``calibrated.collect_stats``: real tokens only, every sample weighing the same. With
    ``x_float`` (the float path's values of the same tensor) the rows are paired (``PairedStats``)."""
    from onnxfgq.calibrated import _token_mask

    m = _token_mask(mask, x) if mask is not None else None
    weights = None
    if m is not None and x.ndim == 3:
        lengths = np.maximum(m.sum(1, keepdims=True), 1)
        weights = np.broadcast_to(m.shape[1] / lengths, m.shape)[m] * m.mean()
    elif m is not None:
        m = m[:, 0]
    rows = m if m is not None else slice(None)
    if x_float is None:
        st.update(x[rows], weights)
    else:
        st.update_pair(x[rows], x_float[rows], weights)


def _node_dtype(t: Target) -> np.dtype:
    """The dtype the node sees its weight in (after the chain's Casts)."""
    dtype = t.chain.tensor.dtype
    for op in t.chain.ops:
        if op.op_type == "Cast":
            dtype = ir.DataType(op.attributes.get_int("to"))
    return dtype.numpy()


class ColumnChunks:
    """Solves a weight a slice of output columns at a time: a wide weight (an lm_head) never has the
    solver's work arrays for all its columns at once, and the slices run on ``workers`` threads (one
    BLAS thread each: a 7B down projection's solve is one group, which would otherwise leave all cores
    but one idle). Exact for layouts whose blocks are one column wide (group-wise and per-channel), to
    float rounding: GPTQ's error propagation, its act-order and the clipping search act on each column
    separately, given the shared input statistics. The slices are fixed by ``columns``, never by the
    number of workers, so the output bytes are the same on any machine."""

    def __init__(self, solver, columns: int = SOLVE_COLUMNS, workers: int = 0):
        self.solver, self.columns = solver, columns
        self.workers = workers or os.cpu_count() or 1

    def solve(self, w: np.ndarray, spec: QuantSpec):
        from onnxfgq.algorithms.base import QuantizedWeight
        from onnxfgq.quant import QParams

        n = w.shape[1]
        if spec.block_shape[1] != 1 or n <= self.columns:
            return self.solver.solve(w, spec)
        warm = getattr(self.solver, "warm", None)
        if warm is not None:  # shared by the slices: computed once, before they start
            warm()
        for_weight = getattr(self.solver, "for_weight", None)  # what is chosen on the whole weight (GPTAQ)
        solver = for_weight(w) if for_weight is not None else self.solver
        slices = [np.ascontiguousarray(w[:, j:j + self.columns]) for j in range(0, n, self.columns)]
        if self.workers > 1:
            with ThreadPoolExecutor(max_workers=min(self.workers, len(slices))) as pool:
                parts = list(pool.map(lambda x: solver.solve(x, spec), slices))
        else:
            parts = [solver.solve(x, spec) for x in slices]
        qp = parts[0].qparams
        qparams = QParams(np.concatenate([p.qparams.scale for p in parts], axis=1),
                          np.concatenate([p.qparams.zero_point for p in parts], axis=1), qp.block_shape, qp.qr)
        note = next((p.note for p in parts if p.note), "")
        return QuantizedWeight(np.concatenate([p.codes for p in parts], axis=1), qparams, note)


class BlockEngine:
    """The ``Plan.engine`` hook: when the rewriter asks for the first weight of a block, the blocks
    before it are advanced (run with their quantized weights into the cache, and checkpointed when
    there is a work folder), the block's statistics are collected and all its weights are solved on
    the executor; the rewriter then takes the solved weights one by one (``take``)."""

    def __init__(self, chain: Chain, block_of: dict[tuple, int], targets: dict[tuple, list[Target]],
                 wc: WeightConfig, progress: Progress, folder: Path, mask: str | None, *, work=None,
                 executor=None, layouts: Layouts | None = None, awq: AWQEdits | None = None):
        from onnxfgq.engine.executors import make_executor

        self.chain, self.block_of, self.targets = chain, block_of, targets
        self.wc, self.progress = wc, progress
        self.cache = ActivationCache(folder)
        self.order = list(block_of)  # weight index (in the work folder) -> key
        self.current = -1  # the block whose statistics are collected and whose weights are solved
        self.finished = -1  # the last block advanced (and checkpointed)
        self.effective: dict[tuple, np.ndarray] = {}  # weight key -> float weight its codes compute
        self.ready: dict[tuple, QuantizedWeight] = {}  # solved, until the rewriter takes it
        self.errors: dict[tuple, float | None] = {}  # output error on the calibration statistics
        self.restored: dict[tuple, QuantizedWeight] = {}  # from the work folder's finished blocks
        self.saved: dict[int, dict] = {}  # weight index -> its checkpoint entry (current block)
        self.taken: set[tuple] = set()
        self.refused: set[tuple] = set()  # non-finite weights: kept float by the rewriter
        self.mask = mask
        self.plan = None
        self.work = work
        self.executor = executor or make_executor(wc.executor)
        folder_cleanup = (lambda: None) if work is not None else (lambda: shutil.rmtree(str(folder), True))
        self._cleanup = weakref.finalize(self, _close, self.executor, folder_cleanup)
        last_reader: dict[str, int] = {}
        for b in chain.blocks:
            for name in b.inputs:
                last_reader[name] = b.index
        self.last_reader = last_reader
        self.last_block = max(block_of.values(), default=-1)
        self.started: float | None = None  # when the first block's work began (for the estimate)
        self.first = -1  # the first block this process worked on (a resumed run skips the others)
        self.paired = wc.gptaq  # keep the float path beside the quantized one (--gptaq)
        # later blocks read what the quantized blocks produce (--sequential; --gptaq pairs both paths)
        self.sequential = wc.gptq_sequential or wc.gptaq
        self.float_done: set[int] = set()  # blocks whose float-path outputs are in the cache
        self.ahead_done: set[int] = set()  # blocks whose outputs were cached by their statistics run
        self.layouts, self.awq = layouts, awq  # per-layer choices made from a block's statistics
        self.pending_awq: dict[int, dict[tuple, tuple]] = {}  # resumed: block -> its weights' AWQ scales
        # the tensor each weight reads, as the blocks name it (an AWQ edit renames it in the output graph)
        self.reads = {key: ts[0].node.inputs[0].name for key, ts in targets.items()}

    # -- feeds
    def write_feeds(self, reader_batches: Iterable[dict[str, np.ndarray]]) -> int:
        for i, feed in enumerate(reader_batches):
            for name in self.chain.graph_inputs:
                if name in feed:
                    self.cache.put(name, i, feed[name])
            self.cache.batches = i + 1
        return self.cache.batches

    def restore(self, plan) -> None:
        """Continue from the work folder: finished blocks' weights, the cache's state."""
        w = self.work
        self.finished = self.current = w.finished
        self.cache.ids = dict(w.manifest["cache"]["ids"])
        self.cache.batches = int(w.manifest["cache"]["batches"])
        plan.calibration_rows = int(w.manifest.get("rows", 0))
        scales = {}
        for j, (qw, err, extra) in w.load_weights().items():
            key = self.order[j]
            self.restored[key] = qw
            self.errors[key] = err
            if extra.get("awq_scale") is not None:
                scales[key] = (extra["awq_scale"], extra.get("awq_note", ""))
        for key in self.order:  # the finished blocks' graph edits, redone when their block comes (``take``)
            if key in scales:
                self.pending_awq.setdefault(self.block_of[key], {})[key] = scales[key]

    def _feed(self, block: Block, i: int) -> dict[str, np.ndarray]:
        return {n: self.cache.get(n, i) for n in block.inputs}

    def _float_name(self, name: str) -> str:
        """Cache name of a tensor on the float path (the model's inputs are the same on both)."""
        return name if name in self.chain.graph_inputs else FLOAT + name

    def _float_feed(self, block: Block, i: int) -> dict[str, np.ndarray]:
        return {n: self.cache.get(self._float_name(n), i) for n in block.inputs}

    def _needed(self, block: Block) -> list[str]:
        """The block's outputs that a later block reads."""
        return [n for n in block.outputs if self.last_reader.get(n, -1) > block.index]

    def _mask(self, i: int) -> np.ndarray | None:
        return np.asarray(self.cache.get(self.mask, i)) != 0 if self.mask else None

    # -- hooks
    def take(self, plan, t: Target, w: np.ndarray) -> QuantizedWeight:
        """The solved weight of ``t`` (advancing, calibrating and solving blocks as needed)."""
        key = t.chain.key + (t.transposed,)
        if key in self.restored:
            scales = self.pending_awq.pop(self.block_of[key], None)
            if scales and self.awq is not None:  # at the point the interrupted run made them: same bytes
                self.awq.redo(plan, {k: self.targets[k][0] for k in scales}, scales, self.reads)
            return self.restored.pop(key)
        b = self.block_of[key]
        while self.current < b:
            if self.current >= 0:
                self._advance(self.chain.blocks[self.current])
            self.current += 1
            self._collect(plan, self.chain.blocks[self.current])
        qw = self.ready.pop(key)
        effective = plan.effective(t, qw)
        p = plan.weights[key]
        if p.stats is not None and p.stats.rows:  # p.stats is of x / s under AWQ: compare s W with Q(s W)
            scaled = p.awq_scale is not None
            self.errors[key] = _sampled_output_error(w * p.awq_scale[:, None] if scaled else w,
                                                     qw.dequantize() if scaled else effective, p.stats)
        else:
            self.errors[key] = None
        if self.sequential and b < len(self.chain) - 1:  # the last block's outputs feed nothing
            self.effective[key] = effective
        if self.work is not None:
            j = self.order.index(key)
            self.saved[j] = self.work.save_weight(j, b, qw, awq_scale=p.awq_scale, awq_note=p.awq_note)
        self.taken.add(key)
        if b == self.last_block and all(k in self.taken for k, kb in self.block_of.items()
                                        if kb == b and k not in self.refused):
            self._finish(self.chain.blocks[b])
            self.close()
        return qw

    def error(self, t: Target) -> float | None:
        return self.errors.get(t.chain.key + (t.transposed,))

    def close(self) -> None:
        if self.plan is not None:  # the statistics' released Gram matrices live in temporary files
            for p in self.plan.weights.values():
                if p.stats is not None:
                    p.stats.discard()
        self._cleanup()

    def _label(self, block: Block, step: str) -> str:
        """'block 3/25 statistics', and the run's elapsed time and estimate once a block is done
        (from the weight bytes of the blocks done and left)."""
        if self.started is None:
            self.started, self.first = time.perf_counter(), block.index
        label = f"block {block.index + 1}/{len(self.chain)} {step}"
        done = sum(b.weight_bytes() for b in self.chain.blocks[self.first:block.index])
        if done:
            left = sum(b.weight_bytes() for b in self.chain.blocks[block.index:])
            elapsed = time.perf_counter() - self.started
            label += f" (run {_minutes(elapsed)}, about {_minutes(elapsed / done * left)} left)"
        return label

    # -- steps
    def _collect(self, plan, block: Block) -> None:
        """Statistics of the inputs of every weight in ``block``, from its cached inputs; then every
        weight of the block solved on the executor. With ``--gptaq`` in two stages: the weights that
        read the block's inputs first, then the others observed with those already quantized (GPTQ's
        true-sequential order inside a block), so their target covers the first ones' error too."""
        keys = [key for key in self.order if self.block_of[key] == block.index]
        if not keys:
            return
        reads = {key: self.reads[key] for key in keys}
        names = list(dict.fromkeys(reads.values()))
        stages = [names]
        if self.paired:
            first = _upstream_of_weights(block, names, {self.targets[key][0].node.outputs[0].name for key in keys})
            stages = [s for s in ([n for n in names if n in first], [n for n in names if n not in first]) if s]
        stats: dict[str, ActivationStats] = {}
        for stage in stages:
            solved = {key: plan.effective(self.targets[key][0], self.ready[key]) for key in keys if key in self.ready}
            stats.update(self._statistics(block, stage, self._node_weights(solved)))
            staged = [key for key in keys if reads[key] in stage]
            if self.awq is not None:  # scales into the output graph; the statistics become those of x / s
                self.awq.apply(plan, {key: self.targets[key][0] for key in staged}, stats, reads)
            if self.layouts is not None:
                self.layouts.choose(plan, {key: self.targets[key][0] for key in staged}, stats, reads)
            self._solve(plan, block, staged, stats)
        plan.calibration_rows = max(plan.calibration_rows, round(max(s.rows for s in stats.values())))

    def _statistics(self, block: Block, names: list[str], weights: dict[str, np.ndarray]) -> dict:
        """``names``' statistics over the cached batches, the block's weights replaced by ``weights``;
        with ``--gptaq`` paired with the float path (whose outputs are cached on the first call)."""
        inner = [n for n in names if n not in block.inputs]  # the rest are read from the cache
        # on the float path the same run also gives the next blocks' inputs (``_advance`` skips its run)
        ahead = self._needed(block) if not self.sequential and not weights else []
        fetch = list(dict.fromkeys(inner + ahead))
        model, weight_feed = _with_outputs(block, fetch, weights) if fetch else (None, {})
        sess = session(model) if fetch else None
        del model
        # the float path: the block as it is on the float inputs, its outputs cached for later blocks
        outs = self._needed(block) if block.index not in self.float_done else []
        fnames = list(dict.fromkeys(inner + outs)) if self.paired else []
        fsess = session(_with_outputs(block, fnames)[0]) if fnames else None
        stats = {n: PairedStats() if self.paired else ActivationStats() for n in names}
        label = self._label(block, "statistics")
        for i in self.progress(range(self.cache.batches), self.cache.batches, label):
            mask = self._mask(i)
            feed = self._feed(block, i)
            values = dict(zip(fetch, sess.run(fetch, {**feed, **weight_feed}))) if sess is not None else {}
            for name in ahead:
                self.cache.put(name, i, values[name])
            fvalues = {}
            if self.paired:
                ffeed = self._float_feed(block, i)
                fvalues = {**ffeed, **dict(zip(fnames, fsess.run(fnames, ffeed)))} if fsess else ffeed
                for name in outs:
                    self.cache.put(FLOAT + name, i, fvalues[name])
            for name in names:
                x = values[name] if name in values else feed[name]
                _observe(stats[name], x, mask, fvalues[name] if self.paired else None)
        del sess, fsess
        if self.paired:
            self.float_done.add(block.index)
        if ahead:
            self.ahead_done.add(block.index)
        return stats

    def _solve(self, plan, block: Block, keys: list[tuple], stats: dict[str, ActivationStats]) -> None:
        """``keys``' weights solved on the executor (grouped by the input they read) into ``ready``."""
        groups: dict[str, list[tuple]] = {}
        for key in keys:
            p = plan.weights[key]
            name = self.reads[key]
            p.stats = stats[name]
            p.solver = None  # solved here, on the executor
            groups.setdefault(name, []).append(key)
        jobs, order = [], []
        for name, ks in groups.items():
            items = []
            for key in ks:
                t = self.targets[key][0]
                w = t.weight()
                if not np.all(np.isfinite(w)):  # the rewriter keeps it float and never asks
                    self.refused.add(key)
                    continue
                # read again when its solve starts: a 7B MLP block's three weights are 540 MB
                scale = plan.weights[key].awq_scale
                load = t.weight if scale is None else _Scaled(t.weight, scale)
                items.append((WeightRef(load, w.shape), plan.weights[key].spec))
                del w
                order.append(key)
            if items:
                jobs.append((stats[name], items))
        n = sum(len(items) for _, items in jobs)
        label = self._label(block, f"solve {n} weight{'s' if n != 1 else ''}")
        results = iter(order)
        for group in self.progress(self.executor.map(self.wc, jobs), len(jobs), label):
            for qw in group:
                self.ready[next(results)] = qw
        for name in groups:  # GPTQ's factorisations: done with (the statistics stay for the report)
            stats[name].cache.clear()

    def _node_weights(self, effective: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
        """``_with_weights``' argument: each weight key's float weight, as its nodes see it."""
        weights = {}
        for key, w in effective.items():
            for t in self.targets[key]:
                wn = w.astype(_node_dtype(t))
                weights[t.node.outputs[0].name] = np.ascontiguousarray(wn.T if t.transposed else wn)
        return weights

    def _advance(self, block: Block) -> None:
        """Run ``block`` (with its weights as quantized where sequential, else as it is); its outputs go
        to the cache for later blocks. Statistics and effective weights of the block are dropped; the
        block is checkpointed."""
        if block.index <= self.finished:
            return
        weights = self._node_weights({key: w for key, w in self.effective.items() if self.block_of[key] == block.index})
        needed = self._needed(block) if block.index not in self.ahead_done else []
        if needed:
            model, weight_feed = _with_weights(block, weights) if weights else (block.model, {})
            sess = session(model)
            for i in range(self.cache.batches):
                for name, x in zip(needed, sess.run(needed, {**self._feed(block, i), **weight_feed})):
                    self.cache.put(name, i, x)
            del sess, weight_feed
        if needed and self.paired and block.index not in self.float_done:  # a block without weights
            sess = session(block.model)
            for i in range(self.cache.batches):
                for name, x in zip(needed, sess.run(needed, self._float_feed(block, i))):
                    self.cache.put(FLOAT + name, i, x)
            del sess
        del weights
        for key, b in self.block_of.items():
            if b == block.index:
                self.effective.pop(key, None)
                if self.plan is not None:  # its statistics (and the solver's cached inverses) are done
                    if self.plan.weights[key].stats is not None:
                        self.plan.weights[key].stats.discard()
                    self.plan.weights[key].stats = None
                    self.plan.weights[key].solver = None
        self._finish(block)
        for name in block.inputs:
            if self.last_reader.get(name) == block.index and name != self.mask:
                self.cache.drop(name)
                if self.paired:
                    self.cache.drop(self._float_name(name))

    def _finish(self, block: Block) -> None:
        """Block ``block`` is done: checkpoint it (with a work folder) and tell the log."""
        from onnxfgq.graph.io import pause_point

        self.finished = block.index
        if self.work is not None:
            entries = {}
            for j, entry in self.saved.items():
                entries[j] = {**entry, "error": self.errors.get(self.order[j])}
            self.work.finish_block(block.index, entries, self.cache.ids, self.cache.batches,
                                   self.plan.calibration_rows if self.plan is not None else 0)
            self.saved = {}
        pause_point(f"block{block.index}")


class _Scaled:
    """A weight's loader times an AWQ scale over its input channels (rows): ``diag(s) W``."""

    def __init__(self, load: Callable[[], np.ndarray], scale: np.ndarray):
        self.load, self.scale = load, scale

    def __call__(self) -> np.ndarray:
        return self.load() * self.scale[:, None]


class AWQEdits:
    """AWQ block by block: for each input tensor of a block's weights, the shared scale ``s`` searched
    on its statistics (``algorithms/awq.search_scale``, as the whole-model planner does), ``x / s``
    made in the output graph (``graph/awq_fold``: folded into a LayerNormalization or one Mul), the
    weights solved as ``diag(s) W`` on the statistics of ``x / s``. The float path is unchanged by
    the edit (exact in real arithmetic), so later blocks' inputs do not depend on it."""

    def __init__(self, model: ir.Model, targets: Sequence[Target], wc: WeightConfig):
        self.graph, self.targets, self.wc = model.graph, list(targets), wc

    def apply(self, plan, targets: dict[tuple, Target], stats: dict[str, ActivationStats],
              reads: dict[tuple, str]) -> None:
        """Scales for ``targets`` (the weights of one stage of a block), from ``stats`` of the tensors
        they read (``reads``: names as the block sees them)."""
        from onnxfgq.calibrated import awq_for_input

        groups: dict[str, list[tuple]] = {}
        for key, t in targets.items():
            groups.setdefault(reads[key], []).append(key)
        for name, keys in groups.items():
            applied = awq_for_input(self.graph, self.targets, [targets[k] for k in keys],
                                    [plan.weights[k].spec for k in keys], stats[name])
            if applied is None:
                continue
            found, note = applied
            stats[name].rescale(found.scale)
            for k in keys:  # the report's per-layer detail says it, as the whole-model planner's does
                plan.weights[k].awq_scale = found.scale
                plan.weights[k].awq_note = f"awq alpha {found.alpha:.2f} ({note})"

    def redo(self, plan, targets: dict[tuple, Target], scales: dict[tuple, tuple[np.ndarray, str]],
             reads: dict[tuple, str]) -> None:
        """A resumed run: the finished blocks' scales (from the work folder) applied to the graph again."""
        from onnxfgq.graph.awq_fold import apply_input_scale

        groups: dict[str, list[tuple]] = {}
        for key in targets:
            scale, note = scales[key]
            plan.weights[key].awq_scale, plan.weights[key].awq_note = scale, note
            groups.setdefault(reads[key], []).append(key)
        for keys in groups.values():  # once per tensor: the edit renames what its readers read
            value = targets[keys[0]].node.inputs[0]
            apply_input_scale(self.graph, value, [t.node for t in self.targets if t.node.inputs[0] is value],
                              scales[keys[0]][0])


class Layouts:
    """Adaptive granularity block by block: each weight's layout is the coarsest whose output error on
    its statistics stays under ``--max-error`` (``calibrated._choices``, the whole-model rule)."""

    def __init__(self, fmt, wc: WeightConfig, targets: Sequence[Target]):
        from onnxfgq.calibrated import scale_bits_of

        self.fmt, self.wc = fmt, wc
        self.scale_bits = scale_bits_of(targets)

    def choose(self, plan, targets: dict[tuple, Target], stats: dict[str, ActivationStats],
               reads: dict[tuple, str]) -> None:
        from onnxfgq.algorithms.adaptive import choose_under_budget
        from onnxfgq.calibrated import _choices

        for key, t in targets.items():
            p = plan.weights[key]
            w = t.weight()
            if p.awq_scale is not None:
                w = w * p.awq_scale[:, None]
            pick = choose_under_budget(_choices(w, self.wc, self.fmt, stats[reads[key]],
                                                self.scale_bits), self.wc.max_error)
            p.spec, p.estimated_error = pick.spec, pick.error


ERROR_COLUMNS = 128  # output columns the report's per-layer output error is measured on


def _sampled_output_error(w: np.ndarray, wq: np.ndarray, stats: ActivationStats) -> float:
    """The relative output error on the calibration statistics (the report's output SQNR), measured
    on ``ERROR_COLUMNS`` evenly spaced output columns: exact costs K^2 N (as much as GPTQ itself on a
    7B layer: 70 s of a loaded 2-core machine per 4096 x 4096 weight), the sample K^2 * 128."""
    n = w.shape[1]
    if n > ERROR_COLUMNS:
        cols = np.unique(np.linspace(0, n - 1, ERROR_COLUMNS).round().astype(np.int64))
        w, wq = w[:, cols], wq[:, cols]
    return stats.output_error(w, wq)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _close(executor, cleanup) -> None:
    executor.close()
    cleanup()


def plan_blockwise(model: ir.Model, targets: Sequence[Target], wc: WeightConfig, fmt, progress: Progress,
                   feeds=None, work=None):
    """A ``calibrated.Plan`` for ``targets`` whose statistics come block by block (module docstring),
    or the reason the whole-model planner must do it instead: mixed layouts under --target-bits (one
    budget over every layer's end-to-end errors), AWQ with --gptaq, a weight shared by several blocks,
    or a graph that does not cut into at least two blocks. AWQ scales and adaptive layouts (per-layer
    --max-error) are chosen block by block, from the same statistics as the whole-model planner's. With ``work`` (a checkpoint.Work) the run is checkpointed
    block by block in its folder, and continued from it when ``work.resume``."""
    from onnxfgq.calibrated import Plan, WeightPlan, _mask_input, open_calibration_source, weight_key
    from onnxfgq.calibration.sources import iterate
    from onnxfgq.config import Granularity

    if wc.target_bits > 0:
        return "--target-bits spends one budget over every layer's measured end-to-end errors at once"
    if "awq" in wc.algorithm.parts and wc.gptaq:
        return "AWQ does not combine with --gptaq"
    chain = partition(model)
    if len(chain) < 2:
        return chain.note
    mm = [t for t in targets if t.kind == "matmul"]
    owner: dict[str, int] = {}
    for b in chain.blocks:
        for node in b.model.graph:
            for o in node.outputs:
                owner.setdefault(o.name, b.index)
    by_key: dict[tuple, list[Target]] = {}
    for t in mm:
        by_key.setdefault(weight_key(t), []).append(t)
    block_of = {}
    for key, ts in by_key.items():
        blocks = {owner.get(t.node.outputs[0].name) for t in ts}
        if len(blocks) != 1 or None in blocks or len({t.node.inputs[0].name for t in ts}) != 1:
            return f"weight of {ts[0].name} is shared by several blocks or inputs"
        block_of[key] = blocks.pop()
    plan = Plan()
    for key, ts in by_key.items():
        k, n = ts[0].shape_kn
        plan.weights[key] = WeightPlan(QuantSpec(wc.bits, wc.block_shape((k, n), 0, 1), wc.symmetric),
                                       None, wc.algorithm.value)
    if work is not None:
        work.start(len(chain))
        folder = work.cache
    else:
        folder = Path(tempfile.mkdtemp(prefix="onnxfgq-blocks-"))
    engine = BlockEngine(chain, block_of, by_key, wc, progress, folder, _mask_input(model), work=work,
                         layouts=Layouts(fmt, wc, mm) if wc.granularity is Granularity.ADAPTIVE else None,
                         awq=AWQEdits(model, mm, wc) if "awq" in wc.algorithm.parts else None)
    engine.plan = plan
    if work is not None and work.finished >= 0:
        engine.restore(plan)
        batches = engine.cache.batches
        plan.notes.append(f"--resume: {work.finished + 1} of {len(chain)} blocks read back from {work.folder}")
    else:
        batches = engine.write_feeds(iterate(open_calibration_source(model, wc, feeds)))
    plan.engine = engine
    solves = f"; solves on {engine.executor.name}" if wc.executor != "threads" else ""
    per_block = [x for x, on in (("AWQ scales", engine.awq), ("adaptive layouts", engine.layouts)) if on is not None]
    chosen = f"; {' and '.join(per_block)} chosen block by block" if per_block else ""
    plan.notes.append(f"calibrated block by block on {wc.calibration} ({batches} batches; {chain.note}{solves}"
                      f"{chosen})")
    return plan
