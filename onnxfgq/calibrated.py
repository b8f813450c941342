"""Calibrated weight-only quantization: statistics of every MatMul input, then per-weight decisions.

1. One pass of onnxruntime over the calibration data streams each MatMul input (a tensor read by
   q, k and v is observed once) into an ``ActivationStats``: ``X^T X`` and ``mean |x|``. Only those
   accumulators stay in memory, never the activations; padding positions (attention mask 0) are
   left out when the model has a mask input.
2. AWQ (if asked): one scale per input tensor, searched for all the weights that read it; the graph
   pass divides the activations by it (folded into a LayerNorm, else a Mul).
3. Per weight: the layout (fixed, adaptive under ``max_error``, or allocated under ``target_bits``)
   and the solver (RTN, clipping search, GPTQ) bound to its input's statistics.

``api._quantize_model`` calls ``plan_weights`` and then ``Plan.solve`` per weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms.adaptive import (
    BLOCK_CANDIDATES,
    Choice,
    candidate_specs,
    choose_under_budget,
    storage_bits,
)
from onnxfgq.algorithms.awq import search_scale
from onnxfgq.algorithms.base import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.clip import ClipSearch
from onnxfgq.algorithms.gptaq import GPTAQ, PairedStats
from onnxfgq.algorithms.gptq import GPTQ
from onnxfgq.algorithms.mixed import allocate, check_budget, compare_uniform
from onnxfgq.algorithms.rtn import RTN
from onnxfgq.algorithms.stats import ActivationStats, output_error, weight_error
from onnxfgq.calibration.feeds import FeedOptions
from onnxfgq.config import Granularity, OutputFormat, WeightConfig
from onnxfgq.graph.targets import Target
from onnxfgq.quant import compute_qparams, dequantize, quantize

Progress = Callable[[Iterable, int, str], Iterable]
MIXED_BITS = (4, 8)  # bit widths mixed precision chooses between (with the configured one)


def needs_plan(wc: WeightConfig) -> bool:
    return (wc.algorithm.value != "rtn" or wc.granularity is Granularity.ADAPTIVE or wc.target_bits > 0
            or bool(wc.calibration))


def weight_key(t: Target) -> tuple:
    return t.chain.key + (t.transposed,)


@dataclass
class WeightPlan:
    spec: QuantSpec
    solver: object  # a WeightQuantizer
    algorithm: str
    stats: ActivationStats | None = None  # of the (scaled) input
    awq_scale: np.ndarray | None = None
    awq_note: str = ""
    estimated_error: float | None = None


@dataclass
class Sequential:
    """GPTQ's sequential mode: weights are solved in graph order, and before each chunk of input
    tensors is used its statistics are re-collected from the model as quantized so far, so later
    layers compensate the error of earlier ones. Chunks of a few tensors keep the passes few
    (a transformer layer reads four)."""

    model: ir.Model
    wc: WeightConfig
    progress: Progress
    chunks: list[list[str]]  # input tensor names in graph order
    readers: dict[str, list[tuple]]  # tensor name -> weight keys reading it
    done: set[str] = field(default_factory=set)
    passes: int = 0
    feeds: FeedOptions | None = None


@dataclass
class Plan:
    weights: dict[tuple, WeightPlan] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration_rows: int = 0
    sequential: Sequential | None = None
    engine: object | None = None  # engine.runner.BlockEngine: statistics block by block

    def covers(self, t: Target) -> bool:
        return weight_key(t) in self.weights

    def _refresh(self, t: Target) -> None:
        seq = self.sequential
        name = t.node.inputs[0].name
        if seq is None or name in seq.done or name not in seq.readers:
            return
        chunk = next(c for c in seq.chunks if name in c)
        stats, _ = collect_stats(seq.model, chunk, seq.wc, seq.progress, seq.feeds)
        for tensor in chunk:
            for key in seq.readers[tensor]:
                p = self.weights[key]
                p.stats = stats[tensor]
                p.solver = _solver(seq.wc, p.stats)
        seq.done.update(chunk)
        seq.passes += 1

    def solve(self, t: Target, w: np.ndarray) -> QuantizedWeight:
        if self.engine is not None:  # solved block by block (engine/runner.py)
            return self.engine.take(self, t, w)
        self._refresh(t)
        p = self.weights[weight_key(t)]
        if p.awq_scale is not None:
            w = w * p.awq_scale[:, None]
        return p.solver.solve(w, p.spec)

    def effective(self, t: Target, qw: QuantizedWeight) -> np.ndarray:
        """The float weight the quantized graph computes with, in the original (unscaled) input basis."""
        p = self.weights[weight_key(t)]
        wq = qw.dequantize()
        return wq / p.awq_scale[:, None] if p.awq_scale is not None else wq

    def output_error(self, t: Target, w: np.ndarray, qw: QuantizedWeight) -> float | None:
        """Relative output error of this weight on the calibration data (None without calibration)."""
        if self.engine is not None:  # measured when solved (kept in the work folder for --resume)
            return self.engine.error(t)
        p = self.weights[weight_key(t)]
        if p.stats is None or not p.stats.rows:
            return None
        wq = qw.dequantize()
        if p.awq_scale is not None:  # p.stats is of x / s: compare (x / s) (s W) with (x / s) Q(s W)
            w = w * p.awq_scale[:, None]
        return p.stats.output_error(w, wq)


# ---------------------------------------------------------------------------------------- statistics
def _mask_input(model: ir.Model) -> str | None:
    from onnxfgq.calibration.feeds import Role, input_specs

    return next((s.name for s in input_specs(model) if s.role is Role.MASK), None)


def _token_mask(m: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """The attention mask ``m`` ([batch, past + sequence]) over the rows of activation ``x``
    ([batch, sequence, K] or flattened [batch * sequence, K]); None when they do not line up."""
    if m.ndim != 2:
        return None
    if x.ndim == 3 and x.shape[0] == m.shape[0] and x.shape[1] <= m.shape[1]:
        return m[:, m.shape[1] - x.shape[1]:]  # a KV-cache model's mask also covers the past
    if x.ndim == 2 and x.shape[0] == m.size:
        return m.reshape(-1, 1)
    return None


@dataclass
class Calibration:
    """What a calibration pass used: batches, samples and how the feeds were made."""

    batches: int = 0
    samples: int = 0
    feeds: str = ""

    def note(self, spec: str, rows: int) -> str:
        what = f"; {self.feeds}" if self.feeds else ""
        return (f"calibrated on {spec}: {self.samples} samples in {self.batches} batches, {rows} token rows "
                f"per input{what}")


def open_calibration_source(model: ir.Model, wc: WeightConfig, feeds: FeedOptions | None, *,
                            num_samples: int | None = None, batch_size: int | None = None):
    from onnxfgq.calibration.sources import open_source

    return open_source(wc.calibration, model, num_samples=num_samples or wc.calibration_samples,
                       batch_size=batch_size or wc.calibration_batch_size, options=feeds or FeedOptions(),
                       option="--calibration")


def collect_stats(model: ir.Model, values: Sequence[str], wc: WeightConfig, progress: Progress,
                  feeds: FeedOptions | None = None) -> tuple[dict[str, ActivationStats], Calibration]:
    """``{tensor name: ActivationStats}`` over the calibration data, and what the pass used.
    ``feeds`` carries --dim, --tokenizer and the model's folder to the data source."""
    from onnxfgq.calibration.collect import Collector

    reader = open_calibration_source(model, wc, feeds)
    stats = {name: ActivationStats() for name in values}
    mask_name = _mask_input(model)
    current: dict[str, np.ndarray | None] = {"mask": None}
    counted = {"samples": 0}

    def keep_mask(m: np.ndarray) -> None:
        current["mask"] = np.asarray(m) != 0

    def sink_for(st: ActivationStats):
        def sink(x: np.ndarray) -> None:
            m = current["mask"]
            m = _token_mask(m, x) if m is not None else None
            if m is not None and x.ndim == 3:
                # real tokens only, and every sample weighs the same whatever its length
                lengths = np.maximum(m.sum(1, keepdims=True), 1)
                weights = np.broadcast_to(m.shape[1] / lengths, m.shape)[m] * m.mean()
                st.update(x[m], weights)
            elif m is not None:  # rows flattened to [batch * sequence, K]: real tokens only
                st.update(x[m[:, 0]])
            else:
                st.update(x)
        return sink

    names = ([mask_name] if mask_name else []) + list(values)
    sinks = {name: [sink_for(stats[name])] for name in values}
    if mask_name:
        sinks[mask_name] = [keep_mask] + sinks.get(mask_name, [])
    collector = Collector(model, names)  # the mask comes first in every batch, then the tensors
    batch = getattr(reader, "fixed_batch", None) or wc.calibration_batch_size
    batches = collector.run(_Counting(reader, counted), sinks, progress=progress,
                            total=-(-wc.calibration_samples // batch))
    return stats, Calibration(batches, counted["samples"], getattr(reader, "description", ""))


class _Counting:
    """Passes feeds through, adding each feed's batch (axis 0 of its first input) to ``counts``."""

    def __init__(self, reader, counts: dict):
        self.reader, self.counts = reader, counts

    def get_next(self):
        feed = self.reader.get_next()
        if feed:
            first = next(iter(feed.values()))
            self.counts["samples"] += int(first.shape[0]) if np.ndim(first) else 1
        return feed


# ---------------------------------------------------------------------------------------- planning
def _fake_quant(w: np.ndarray, spec: QuantSpec) -> np.ndarray:
    qp = compute_qparams(w, spec.block_shape, spec.bits, symmetric=spec.symmetric, signed=False)
    return dequantize(quantize(w, qp), qp)


def _candidate_bits(wc: WeightConfig, fmt: OutputFormat) -> tuple[int, ...]:
    """Bit widths to choose from: with --target-bits, 4 and 8 (mixed precision), unless the
    granularity is adaptive, where the budget is spent on block sizes at the configured width."""
    if wc.target_bits <= 0 or wc.granularity is Granularity.ADAPTIVE:
        return (wc.bits,)
    return tuple(sorted({wc.bits, *MIXED_BITS}))


def _specs(k: int, n: int, wc: WeightConfig, fmt: OutputFormat) -> list[QuantSpec]:
    """The layouts (and bit widths) a ``[K, N]`` weight may take: the configured one, or with
    --target-bits / adaptive every candidate."""
    blocks = BLOCK_CANDIDATES if wc.granularity is Granularity.ADAPTIVE else None
    out = []
    for bits in _candidate_bits(wc, fmt):
        if blocks is None:
            out.append(QuantSpec(bits, wc.block_shape((k, n), 0, 1), wc.symmetric))
        else:
            out += candidate_specs(k, bits, wc.symmetric, power_of_two=fmt is OutputFormat.MATMULNBITS,
                                   blocks=blocks)
    return out


def _choices(w: np.ndarray, wc: WeightConfig, fmt: OutputFormat, stats: ActivationStats | None,
             scale_bits: int) -> list[Choice]:
    k, n = w.shape
    pow2 = fmt is OutputFormat.MATMULNBITS
    h = stats.hessian() if stats is not None and stats.rows else None
    measure = wc.granularity is Granularity.ADAPTIVE or wc.target_bits > 0
    out = []
    for s in _specs(k, n, wc, fmt):
        if not measure:  # nothing to choose: skip the measurement
            err = float("nan")
        else:
            wq = _fake_quant(w, s)
            err = output_error(w, wq, h) if h is not None else weight_error(w, wq)
        out.append(Choice(s, err, storage_bits(k, n, s, scale_bits=scale_bits, pad_to_power_of_two=pow2)))
    return out


def scale_bits_of(targets: Sequence[Target]) -> int:
    """Bits of one stored scale: fp16 when any of the weights is fp16, else fp32."""
    return 16 if any(t.chain.tensor.dtype == ir.DataType.FLOAT16 for t in targets) else 32


def _check_budget(targets: Sequence[Target], wc: WeightConfig, fmt: OutputFormat, scale_bits: int) -> None:
    """Refuse a --target-bits below what the cheapest layouts store, from the shapes alone: before
    calibration and probes, not after them."""
    pow2 = fmt is OutputFormat.MATMULNBITS
    shapes = [t.shape_kn for t in targets]
    floor = sum(min(storage_bits(k, n, s, scale_bits=scale_bits, pad_to_power_of_two=pow2)
                    for s in _specs(k, n, wc, fmt)) for k, n in shapes)
    check_budget(floor, sum(k * n for k, n in shapes), wc.target_bits)


def _solver(wc: WeightConfig, stats: ActivationStats | None):
    parts = wc.algorithm.parts
    if "gptq" in parts and wc.gptaq and isinstance(stats, PairedStats):  # --engine blocks pairs them
        return GPTAQ(stats, alpha=wc.gptaq_alpha, damp=wc.gptq_damp, act_order=wc.gptq_act_order,
                     clip="clip" in parts)
    if "gptq" in parts:
        return GPTQ(stats, damp=wc.gptq_damp, act_order=wc.gptq_act_order, clip="clip" in parts)
    if "clip" in parts:
        return ClipSearch(stats)
    return RTN()


def plan_weights(model: ir.Model, targets: Sequence[Target], wc: WeightConfig, fmt: OutputFormat,
                 progress: Progress, feeds: FeedOptions | None = None, work=None) -> Plan:
    """Statistics, AWQ graph edits and per-weight decisions for the MatMul/Gemm ``targets``;
    ``feeds`` (--dim, --tokenizer, the model's folder) reaches every calibration source; ``work``
    (engine/checkpoint.Work) makes an ``--engine blocks`` run resumable."""
    if wc.target_bits > 0:  # an impossible budget is refused before any calibration
        distinct = list({weight_key(t): t for t in targets if t.kind == "matmul"}.values())
        _check_budget(distinct, wc, fmt, scale_bits_of(distinct))
    if wc.engine == "blocks" and wc.calibration:  # block by block (onnxfgq/engine), where it applies
        from onnxfgq.engine.runner import plan_blockwise

        blockwise = plan_blockwise(model, targets, wc, fmt, progress, feeds, work)
        if not isinstance(blockwise, str):
            return blockwise
        if work is not None and work.resume:
            from onnxfgq.config import ConfigError

            raise ConfigError("--resume", f"this run is not block by block ({blockwise}): nothing to resume")
    plan = Plan()
    if wc.engine == "blocks" and wc.calibration:
        plan.notes.append(f"--engine blocks: {blockwise}; calibrated on the whole model")
    mm = [t for t in targets if t.kind == "matmul"]
    inputs = {weight_key(t): t.node.inputs[0] for t in mm}
    stats: dict[str, ActivationStats] = {}
    # Distinct weights, each with the one input tensor it reads (a weight read by two different
    # tensors gets no AWQ scale: one scale cannot suit both).
    by_key: dict[tuple, Target] = {}
    readers: dict[tuple, set[str]] = {}
    for t in mm:
        by_key.setdefault(weight_key(t), t)
        readers.setdefault(weight_key(t), set()).add(t.node.inputs[0].name)

    bounded = None
    if wc.calibration:
        names = list(dict.fromkeys(v.name for v in inputs.values()))
        kdim = {t.node.inputs[0].name: t.shape_kn[0] for t in mm}
        need = sum(8 * kdim[n] ** 2 for n in names)
        upfront = "awq" in wc.algorithm.parts or wc.granularity is Granularity.ADAPTIVE or wc.target_bits > 0
        if need > GRAM_BUDGET_BYTES and not upfront and fmt is not OutputFormat.CUSTOM:
            # Too many statistics to hold at once: collect them a chunk of tensors at a time, just
            # before the weights that read them are solved (from the model as quantized so far).
            bounded = _chunked(model, by_key, readers, max_bytes=GRAM_BUDGET_BYTES, kdim=kdim)
            names = bounded.chunks[0]
            plan.notes.append(f"statistics of {need / 2**30:.1f} GiB: collected in {len(bounded.chunks)} passes")
        stats, used = collect_stats(model, names, wc, progress, feeds)
        rows = round(max((s.rows for s in stats.values()), default=0))
        plan.calibration_rows = rows
        plan.notes.append(used.note(wc.calibration, rows))

    awq_scale: dict[tuple, np.ndarray] = {}
    awq_note: dict[tuple, str] = {}
    input_stats = {key: stats.get(t.node.inputs[0].name) for key, t in by_key.items()}
    if "awq" in wc.algorithm.parts:
        groups: dict[str, list[tuple]] = {}
        for key, t in by_key.items():
            if len(readers[key]) == 1:
                groups.setdefault(t.node.inputs[0].name, []).append(key)
        for name, keys in progress(list(groups.items()), len(groups), "awq"):
            st = stats[name]
            specs = [QuantSpec(wc.bits, wc.block_shape(by_key[k].shape_kn, 0, 1), wc.symmetric) for k in keys]
            applied = awq_for_input(model.graph, mm, [by_key[k] for k in keys], specs, st)
            if applied is None:
                continue
            found, note = applied
            scaled = st.scaled(found.scale)
            for k in keys:
                awq_scale[k] = found.scale
                awq_note[k] = f"awq alpha {found.alpha:.2f} ({note})"
                input_stats[k] = scaled
            plan.notes.append(f"awq {name}: alpha {found.alpha:.2f}, calibration output error "
                              f"{found.rtn_error:.2e} -> {found.error:.2e}; {note}")

    scale_bits = scale_bits_of(mm)
    keys = list(by_key)
    options = []
    for key in keys:
        w = by_key[key].weight()
        if key in awq_scale:
            w = w * awq_scale[key][:, None]
        options.append(_choices(w, wc, fmt, input_stats[key], scale_bits))
    if wc.target_bits > 0 and wc.calibration:
        options = _measured(model, wc, [by_key[k] for k in keys], options, awq_scale, keys, plan, feeds,
                            [input_stats[k] for k in keys])
    if wc.target_bits > 0:
        sizes = [by_key[k].shape_kn[0] * by_key[k].shape_kn[1] for k in keys]
        picks = allocate(options, sizes, wc.target_bits)
        avg = sum(c.storage_bits for c in picks) / sum(sizes)
        what = "block sizes" if wc.granularity is Granularity.ADAPTIVE else "bit widths"
        plan.notes.append(f"{what} chosen under --target-bits {wc.target_bits}: {avg:.3f} bits per weight planned")
        vs = compare_uniform(options, picks, sizes, [by_key[k].shape_kn[0] for k in keys], wc.target_bits)
        if vs is not None:
            label, bits, uniform, mine = vs
            change = f"{(mine / uniform - 1) * 100:+.1f}%" if uniform > 0 else "n/a"
            plan.notes.append(f"predicted (summed per-layer errors, what the allocation minimises): "
                              f"{mine:.4g} against {uniform:.4g} for {label} everywhere ({bits:.3f} bits), {change}")
    elif wc.granularity is Granularity.ADAPTIVE:
        picks = [choose_under_budget(o, wc.max_error) for o in options]
    else:
        picks = [o[0] for o in options]
    for key, pick in zip(keys, picks):
        st = input_stats[key]
        plan.weights[key] = WeightPlan(pick.spec, _solver(wc, st), wc.algorithm.value, st,
                                       awq_scale.get(key), awq_note.get(key, ""), pick.error)
    if bounded is not None:
        bounded.model, bounded.wc, bounded.progress, bounded.feeds = model, wc, progress, feeds
        plan.sequential = bounded
    elif "gptq" in wc.algorithm.parts and wc.gptq_sequential and wc.calibration:
        if fmt is OutputFormat.CUSTOM:  # the collector's onnxruntime session has no custom ops
            plan.notes.append("sequential GPTQ needs a stock onnxruntime op format; inputs come from the float model")
        else:
            plan.sequential = _sequential(model, wc, progress, by_key, readers)
            if plan.sequential is not None:
                plan.sequential.feeds = feeds
    return plan


def awq_for_input(graph: ir.Graph, targets: Sequence[Target], readers: Sequence[Target], specs: Sequence[QuantSpec],
                  stats: ActivationStats):
    """AWQ for the weights ``readers`` that read one tensor: the scale searched on its ``stats``, and, if
    it is not the identity (alpha 0), ``x / s`` made in ``graph`` for every target reading the tensor.
    Returns (AWQScale, what the graph edit did), or None. Both planners (whole model, block by block)."""
    from onnxfgq.graph.awq_fold import apply_input_scale

    ws = [t.weight() for t in readers]
    found = search_scale(ws, specs, stats)
    del ws
    if found.alpha == 0.0:
        return None
    value = readers[0].node.inputs[0]
    consumers = [t.node for t in targets if t.node.inputs[0] is value]
    return found, apply_input_scale(graph, value, consumers, found.scale)


PROBE_SAMPLES = 16  # calibration samples each sensitivity probe runs on


def _measured(model: ir.Model, wc: WeightConfig, targets: list[Target], options: list[list[Choice]],
              awq_scale: dict, keys: list[tuple], plan: Plan, feeds: FeedOptions | None,
              stats: list[ActivationStats | None]) -> list[list[Choice]]:
    """The options with their errors replaced by the measured end-to-end error (see sensitivity.py).

    Each candidate is probed as the weight's own solver would quantize it (GPTQ's error-compensated
    codes, not RTN's): GPTQ shrinks the error of some layouts far more than others, so RTN's errors
    misprice the budget the allocation spends."""
    from onnxfgq.calibration.sources import iterate
    from onnxfgq.graph.roles import logits_output
    from onnxfgq.sensitivity import probe_errors

    reader = open_calibration_source(model, wc, feeds, num_samples=PROBE_SAMPLES, batch_size=PROBE_SAMPLES)
    feed = next(iterate(reader), None)
    if feed is None:
        return options
    weights = []
    for key, t in zip(keys, targets):
        w = t.weight()
        weights.append(w * awq_scale[key][:, None] if key in awq_scale else w)
    cands = [[_candidate(wc, st, c.spec) for c in o] for o, st in zip(options, stats)]
    logits = logits_output(model.graph)
    errors = probe_errors(model, targets, weights, cands, feed, logits=logits)
    if errors is None:
        plan.notes.append("sensitivity: weights are shared or computed; using per-layer output errors")
        return options
    probed = int(np.shape(next(iter(feed.values())))[0]) if feed and np.ndim(next(iter(feed.values()))) else 1
    measure = f"KL divergence of {logits!r}" if logits else "relative output error"
    plan.notes.append(f"sensitivity measured end to end ({measure}) on {probed} calibration samples "
                      f"({sum(len(o) for o in options)} probes)")
    return [[Choice(c.spec, e, c.storage_bits) for c, e in zip(o, errs)] for o, errs in zip(options, errors)]


def _candidate(wc: WeightConfig, stats: ActivationStats | None,
               spec: QuantSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The float weight one layout gives, as the configured solver computes it."""
    if stats is None or not stats.rows:
        return lambda w: _fake_quant(w, spec)
    solver = _solver(wc, stats)
    return lambda w: solver.solve(w, spec).dequantize()


SEQUENTIAL_CHUNK = 4  # input tensors per re-collection pass
GRAM_BUDGET_BYTES = 1 << 30  # statistics held at once before collection goes chunk by chunk


def _chunked(model: ir.Model, by_key: dict[tuple, Target], readers: dict[tuple, set[str]], *,
             max_tensors: int = 0, max_bytes: int = 0, kdim: dict[str, int] | None = None) -> Sequential:
    """The input tensors (as the nodes read them now, after any AWQ edit) in graph order, in chunks of
    ``max_tensors`` tensors or ``max_bytes`` of statistics. Tensors of weights read by several tensors
    go in the first chunk (they are collected up front, from the float model)."""
    tensors: dict[str, list[tuple]] = {}
    first: list[str] = []
    for key, t in by_key.items():
        if len(readers[key]) == 1:
            tensors.setdefault(t.node.inputs[0].name, []).append(key)
        else:
            first += sorted(readers[key])
    order = {node.outputs[0].name: i for i, node in enumerate(model.graph) if node.outputs}
    names = sorted(tensors, key=lambda n: order.get(n, -1))
    chunks: list[list[str]] = [list(dict.fromkeys(first))]
    size = sum(8 * (kdim or {}).get(n, 0) ** 2 for n in chunks[0])
    for name in names:
        cost = 8 * (kdim or {}).get(name, 0) ** 2
        full = (max_tensors and len(chunks[-1]) >= max_tensors) or (max_bytes and chunks[-1] and size + cost > max_bytes)
        if full:
            chunks.append([])
            size = 0
        chunks[-1].append(name)
        size += cost
    chunks = [c for c in chunks if c]
    seq = Sequential(model, None, None, chunks, tensors)  # the caller sets wc and progress
    seq.done.update(chunks[0])
    return seq


def _sequential(model: ir.Model, wc: WeightConfig, progress: Progress, by_key: dict[tuple, Target],
                readers: dict[tuple, set[str]]) -> Sequential | None:
    """GPTQ's sequential mode: chunks of SEQUENTIAL_CHUNK tensors; the first chunk keeps the
    statistics already collected (nothing before it is quantized)."""
    seq = _chunked(model, by_key, readers, max_tensors=SEQUENTIAL_CHUNK)
    if len(seq.chunks) < 2:
        return None
    seq.wc, seq.progress = wc, progress
    return seq


def storage_bits_of(t: Target, qw: QuantizedWeight, fmt: OutputFormat) -> int:
    """Stored bits of one quantized MatMul weight (codes, scales, zero points) in format ``fmt``."""
    k, n = t.shape_kn
    spec = QuantSpec(qw.bits, tuple(qw.qparams.block_shape), qw.symmetric)
    return storage_bits(k, n, spec, scale_bits=scale_bits_of([t]),
                        pad_to_power_of_two=fmt is OutputFormat.MATMULNBITS)
