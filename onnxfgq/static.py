"""Static int8 quantization (weights + activations) with an automatic accuracy guard.

    prepare (fold BatchNorm, onnxsim, opset >= 13) -> plan units (graph/qdq_static)
    -> calibrate ranges (calibration/collect + observers, streamed) -> build QDQ model
    -> guard: measure the output against FP32 on calibration data; while over budget, keep the most
       sensitive units in float (sensitivity = the error each unit causes when quantized alone).

Ranges can come from a ranges.json written by :func:`save_ranges` (``onnxfgq calibrate``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxfgq.calibration.collect import Collector
from onnxfgq.calibration.feeds import FeedOptions
from onnxfgq.algorithms.bias_correction import corrected_bias
from onnxfgq.calibration.observers import (
    MeanObserver,
    MinMaxObserver,
    PercentileObserver,
    make_observer,
    quantization_snr_db,
)
from onnxfgq.calibration.sources import CalibrationDataReader, iterate
from onnxfgq.config import ActivationConfig, ActivationType, QuantizeConfig, Simplify
from onnxfgq.errors import NothingToQuantizeError, OnnxfgqError
from onnxfgq.evaluate import OutputAgreement
from onnxfgq.graph import external, io, passes, sanity
from onnxfgq.graph.equalize import depthwise_pairs, equalize, equalize_activations, fold_affines
from onnxfgq.graph.fold import fold_batchnorms
from onnxfgq.graph.qdq_static import Plan, TensorQuant, Unit, WeightQuant, insert_qdq, plan_static
from onnxfgq.quant import QParams, dequantize, qrange, quantize, sqnr_db
from onnxfgq.quant.static import activation_qparams, per_channel_scale, quantize_bias
from onnxfgq.report import LayerReport, Report

Progress = Callable[[Iterable, int, str], Iterable]
ReaderFactory = Callable[[], CalibrationDataReader]
STATIC_OPSET = 13  # per-channel DequantizeLinear
FLOAT16_OPSET = 19  # QuantizeLinear/DequantizeLinear with float16 inputs and scales
WIDE_OPSET = 21  # QuantizeLinear/DequantizeLinear with uint16/int16
RANGES_FORMAT = "onnxfgq-ranges/1"
# The guard measures each unit's sensitivity up to this many units, else estimates it. PP-OCRv5 det (74
# units): measured, 36 of 62 Conv in int8 in 109 s; estimated, 3 of 62 in 19 s (docs/BENCHMARKS.md).
MEASURED_UNITS = 128
OUTLIER_RATIO = 1e3  # a tensor whose extremes exceed its calibrated range this much is outlier-dominated


class CalibrationError(OnnxfgqError):
    """Calibration data or ranges that cannot be used."""


def _no_progress(items: Iterable, total: int, label: str) -> Iterable:
    del total, label
    return items


@dataclass
class Ranges:
    """Calibrated per-tensor ranges of the prepared model's tensors."""

    ranges: dict[str, tuple[float, float]]
    minmax: dict[str, tuple[float, float]]
    observer: str
    samples: int
    data: str = ""
    snr_db: dict[str, float] = field(default_factory=dict)  # estimated 8-bit SNR of each tensor at its range
    means: dict[str, list[float]] = field(default_factory=dict)  # per-channel means of weighted ops' inputs
    channels: dict[str, list[float]] = field(default_factory=dict)  # per-channel |x| max, activation equalisation

    def to_json(self) -> str:
        return json.dumps({"format": RANGES_FORMAT, "observer": self.observer, "samples": self.samples,
                           "data": self.data,
                           "tensors": {k: {"range": list(v), "minmax": list(self.minmax.get(k, v)),
                                           "snr_db": _finite_or_none(self.snr_db.get(k))}
                                       for k, v in self.ranges.items()},
                           "means": self.means, "channels": self.channels}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Ranges:
        d = json.loads(text)
        if d.get("format") != RANGES_FORMAT:
            raise CalibrationError(f"not an onnxfgq ranges file (format {d.get('format')!r})")
        t = d["tensors"]
        snr = {k: float(v["snr_db"]) if v.get("snr_db") is not None else float("inf") for k, v in t.items()}
        return cls({k: tuple(v["range"]) for k, v in t.items()}, {k: tuple(v["minmax"]) for k, v in t.items()},
                   d.get("observer", ""), int(d.get("samples", 0)), d.get("data", ""), snr,
                   {k: list(map(float, v)) for k, v in d.get("means", {}).items()},
                   {k: list(map(float, v)) for k, v in d.get("channels", {}).items()})


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def save_ranges(ranges: Ranges, path: str | Path) -> None:
    Path(path).write_text(ranges.to_json())


def load_ranges(path: str | Path) -> Ranges:
    try:
        return Ranges.from_json(Path(path).read_text())
    except (OSError, ValueError, KeyError) as exc:
        raise CalibrationError(f"{path}: cannot read ranges ({exc})") from None


def prepare(model: ir.Model, simplify: Simplify = Simplify.AUTO, *, cle: bool = True) -> tuple[ir.Model, list[str]]:
    """Fold BatchNorm, simplify, fold constant Mul/Add into Convs, equalise Conv pairs (``cle``), and
    raise the opset to 13: the graph calibration and QDQ both see. All exact in float.

    Deterministic, so tensor names in a ranges.json match a later run on the same model."""
    sanity.check(model)
    notes = sanity.normalize(model)
    bn_notes = fold_batchnorms(model)
    passes.remove_unused(model)
    if simplify is not Simplify.NEVER:
        result = io.simplify(model)
        model = result.model
        notes.append(result.note)
        bn_notes = fold_batchnorms(model)  # onnxsim may expose more; only what is still left is news
    notes += bn_notes
    notes += fold_affines(model)
    if cle:
        notes += equalize(model)
    passes.remove_unused(model)
    float16 = any(v.dtype == ir.DataType.FLOAT16 for v in (*model.graph.inputs, *model.graph.initializers.values()))
    note = passes.upgrade_opset(model, FLOAT16_OPSET if float16 else STATIC_OPSET)
    if note:
        notes.append(note)
    return model, notes


def equalize_with_data(model: ir.Model, act: ActivationConfig, data: ReaderFactory | None,
                       known: dict[str, list[float]] | None = None) -> tuple[dict[str, list[float]], list[str]]:
    """Activation equalisation of Conv -> depthwise Conv pairs (``act.cle``), in place: the per-channel
    ranges come from ``known`` (a ranges.json) or one calibration pass; returns them and the notes."""
    pairs = depthwise_pairs(model) if act.cle else []
    if not pairs:
        return {}, []
    names = list(dict.fromkeys(t for *_, t in pairs))
    if known and all(n in known for n in names):
        absmax = {n: known[n] for n in names}
    elif data is not None:
        observers = {n: MinMaxObserver(axis=1) for n in names}
        Collector(model, names).run(data(), {n: [o] for n, o in observers.items()})
        absmax = {}
        for n, o in observers.items():
            if o.batches:
                lo, hi = o.range()
                absmax[n] = [float(v) for v in np.maximum(np.abs(lo), np.abs(hi))]
    else:
        return {}, ["activation equalisation skipped: no calibration data"]
    return absmax, equalize_activations(model, {k: np.asarray(v) for k, v in absmax.items()})


def calibrate(model: ir.Model, plan: Plan, reader: CalibrationDataReader, config: ActivationConfig, *,
              progress: Progress = _no_progress, total: int = 0, data: str = "") -> Ranges:
    """Stream ``reader`` through ``model`` into one observer (plus a MinMax) per planned tensor."""
    names = plan.tensors()
    options = {"percentile": config.percentile} if config.observer.value == "percentile" else {}
    observers = {n: make_observer(config.observer.value, None, **options) for n in names}
    extremes = {n: PercentileObserver(percentile=100.0) for n in names}  # exact extremes + a histogram
    counter = _CountingReader(reader)
    sinks = {n: [observers[n], extremes[n]] for n in names}
    means = {}
    if config.bias_correction:  # one running mean per channel of each weighted op's input
        for u in plan.active:
            if u.weight_index is not None and u.inputs and u.inputs[0] not in means:
                means[u.inputs[0]] = MeanObserver(1 if u.node.op_type in ("Conv", "ConvTranspose") else -1)
                sinks.setdefault(u.inputs[0], []).append(means[u.inputs[0]])
    Collector(model, names).run(counter, sinks, progress=progress, total=total)
    if not counter.samples and names:
        raise CalibrationError("the calibration data source gave no samples")
    ranges = {n: tuple(float(v) for v in observers[n].range()) for n in names}
    minmax = {n: tuple(float(v) for v in extremes[n].range()) for n in names}
    snr = {}
    for n in names:
        lo, hi = ranges[n]
        h = extremes[n].hists[0]
        snr[n] = quantization_snr_db(h, min(lo, 0.0), max(hi, 0.0), 8) if h.width > 0 else float("inf")
    return Ranges(ranges, minmax, config.observer.value, counter.samples, data, snr,
                  {n: [float(v) for v in m.mean()] for n, m in means.items() if m.count})


class _CountingReader:
    """Passes feeds through, counting samples (the first input's leading dimension)."""

    def __init__(self, reader: CalibrationDataReader):
        self.reader, self.samples = reader, 0

    def get_next(self):
        feed = self.reader.get_next()
        if feed:
            first = next(iter(feed.values()))
            self.samples += int(first.shape[0]) if np.ndim(first) else 1
        return feed


def _weight_quant(unit: Unit, x_scale: float | None, mean_x: list[float] | None = None,
                  codes: np.ndarray | None = None) -> tuple[WeightQuant, float]:
    """Per-channel symmetric int8 weight in [-127, 127] (no int16 saturation in u8s8 kernels), int32 bias;
    with ``mean_x`` (the input's per-channel mean) the bias is corrected for the weight's rounding.
    ``codes`` (from the rounding pass, same scales) replace round-to-nearest."""
    w = unit.weight().astype(np.float32)
    axis = unit.weight_axis
    block = tuple(1 if i == axis else d for i, d in enumerate(w.shape))
    scale = per_channel_scale(w, axis)
    qp = QParams(scale, np.zeros(scale.shape, np.int32), block, qrange(8, True))
    codes = quantize(w, qp) if codes is None else codes.astype(np.int32)
    wq_sqnr = sqnr_db(w, dequantize(codes, qp))
    per_channel = scale.reshape(-1)
    bias = unit.bias()
    if mean_x is not None and x_scale is not None:
        bias = _corrected_bias(unit, w, dequantize(codes, qp), bias, np.asarray(mean_x))
    b_codes = b_scale = None
    if bias is not None and x_scale is not None and bias.size == per_channel.size:
        b_codes, b_scale = quantize_bias(bias.reshape(-1), x_scale, per_channel)
    return WeightQuant(codes.astype(np.int8), per_channel, axis, b_codes, b_scale), wq_sqnr


def _corrected_bias(unit: Unit, w: np.ndarray, w_q: np.ndarray, bias: np.ndarray | None,
                    mean_x: np.ndarray) -> np.ndarray | None:
    """The bias with the expected output shift of ``w -> w_q`` removed; unchanged where the op cannot
    take a bias (MatMul, a Gemm without C) or the layout is not [out, in, ...]-convertible."""
    op = unit.node.op_type
    if op == "Conv":
        group = unit.node.attributes.get_int("group", 1)
        if mean_x.size != w.shape[1] * group:
            return bias
        return corrected_bias(bias, w, w_q, mean_x, group)
    if op == "Gemm" and bias is not None and w.ndim == 2:
        w_oi, wq_oi = (w, w_q) if unit.weight_axis == 0 else (w.T, w_q.T)
        if mean_x.size != w_oi.shape[1] or bias.size != w_oi.shape[0]:
            return bias
        return corrected_bias(bias, w_oi, wq_oi, mean_x)
    return bias


def _tensor_quant(lo: float, hi: float, config: ActivationConfig, bits: int = 8) -> TensorQuant:
    signed = config.dtype is ActivationType.INT8
    qp = activation_qparams(lo, hi, signed=signed, symmetric=config.symmetric, bits=bits)
    types = {(8, True): ir.DataType.INT8, (8, False): ir.DataType.UINT8,
             (16, True): ir.DataType.INT16, (16, False): ir.DataType.UINT16}
    return TensorQuant(float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0]), types[bits, signed])


def build(prepared: ir.Model, names: set[str], ranges: Ranges, config: ActivationConfig,
          rounding: dict[str, np.ndarray] | None = None, wide: Collection[str] = ()) -> ir.Model:
    """A copy of ``prepared`` with the units named ``names`` quantized: int8 weights (``rounding``'s codes
    where given), 8-bit activations, 16-bit ones on every tensor of the units in ``wide`` (a subset of
    ``names``; needs opset 21: see :data:`WIDE_OPSET`)."""
    model = prepared.clone()  # shares the tensors (bound to their folder); insert_qdq edits the graph only
    plan = plan_static(model.graph, config.op_types, _neighbour_ops(config))
    units = [u for u in plan.active if u.name in names]
    wide_tensors = {t for u in units if u.name in wide for t in u.tensors}
    # 16 bits need no clipping: the exact extremes (minmax), not the 8-bit observer's clipped range.
    tensors = {t: _tensor_quant(*ranges.minmax.get(t, ranges.ranges[t]), config, 16) if t in wide_tensors
               else _tensor_quant(*ranges.ranges[t], config) for u in units for t in u.tensors}
    weights = {}
    for u in units:
        if u.weight_index is not None:
            x = tensors.get(u.inputs[0]) if u.inputs else None
            mean = ranges.means.get(u.inputs[0]) if config.bias_correction and u.inputs else None
            weights[u.name] = _weight_quant(u, x.scale if x else None, mean, (rounding or {}).get(u.name))[0]
    insert_qdq(model, units, tensors, weights)
    passes.remove_unused(model)
    return model


def _neighbour_ops(config: ActivationConfig) -> tuple[str, ...]:
    from onnxfgq.graph.qdq_static import NEIGHBOUR_OPS

    return NEIGHBOUR_OPS if config.neighbours else ()


class Guard:
    """Output agreement with FP32 on a bounded set of calibration batches, kept in memory."""

    def __init__(self, prepared: ir.Model, batches: list[dict[str, np.ndarray]], metric: str, threshold: float):
        self.batches, self.metric, self.threshold = batches, metric, threshold
        self.reference = [self._session(prepared).run(None, b)[0] for b in batches]
        self.evaluations = 0
        if metric == "top1":
            check = OutputAgreement()
            for ref in self.reference:
                check.update(ref, ref)
            if "top1_agreement" not in check.metrics(with_top1=True):
                raise CalibrationError("--max-error top1: the model's first output has no rows to take the argmax "
                                       f"of (shape {list(self.reference[0].shape)}, or unit-norm embeddings)")

    @staticmethod
    def _session(model: ir.Model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        return external.session(model, so)  # external weights read from the model's own files

    def measure(self, model: ir.Model) -> dict[str, float]:
        self.evaluations += 1
        sess = self._session(model)
        agreement = OutputAgreement()
        for b, ref in zip(self.batches, self.reference):
            agreement.update(ref, sess.run(None, b)[0])
        return agreement.metrics(with_top1=self.reference[0].ndim > 1 and self.reference[0].shape[-1] > 1)

    def value(self, metrics: dict[str, float]) -> float:
        if self.metric == "top1":
            return metrics.get("top1_agreement", float("nan"))
        return metrics["cosine_mean"] if self.metric == "cosine" else metrics["sqnr_db"]

    def ok(self, metrics: dict[str, float]) -> bool:
        return self.value(metrics) >= self.threshold

    def deficit(self, metrics: dict[str, float]) -> float:
        """Additive error measure: 1 - cosine, 1 - top-1 agreement, or noise/signal power."""
        if self.metric in ("cosine", "top1"):
            return max(0.0, 1.0 - self.value(metrics))
        return 10 ** (-metrics["sqnr_db"] / 10)

    def budget(self) -> float:
        return 1.0 - self.threshold if self.metric in ("cosine", "top1") else 10 ** (-self.threshold / 10)


def _take_samples(reader: CalibrationDataReader, samples: int) -> list[dict[str, np.ndarray]]:
    out = []
    for feed in iterate(reader):
        out.append(feed)
        if _samples(out) >= samples:
            break
    return out


def _samples(feeds: list[dict[str, np.ndarray]]) -> int:
    """Samples in ``feeds``: the batch (axis 0 of the first input) of each, 1 for scalars."""
    return sum(int(np.shape(v)[0]) if np.ndim(v) else 1 for v in (next(iter(f.values())) for f in feeds if f))


def quantize_static(model: ir.Model, config: QuantizeConfig, *, data: ReaderFactory | None = None,
                    ranges: Ranges | None = None, progress: Progress = _no_progress,
                    data_label: str = "") -> tuple[ir.Model, Report]:
    """Quantize ``model`` (handed over: it may be modified) statically; returns the model and report.

    ``data()`` opens a fresh calibration reader (called once for ranges unless ``ranges`` is given,
    once for the guard's samples). Without data the guard is skipped and the report says so.
    """
    act = config.activations or ActivationConfig()
    config.validate()
    started = time.perf_counter()
    report = Report(config=json.loads(config.to_json()))
    prepared, notes = prepare(model, config.simplify, cle=act.cle)
    channels, eq_notes = equalize_with_data(prepared, act, data, ranges.channels if ranges else None)
    report.notes += notes + eq_notes
    plan = plan_static(prepared.graph, act.op_types, _neighbour_ops(act))
    if not plan.active:
        reasons = sorted({u.skip_reason for u in plan.units if u.skip_reason})
        raise NothingToQuantizeError(f"nothing to quantize statically: no {'/'.join(act.op_types)} node "
                                     f"can be quantized{' (' + '; '.join(reasons) + ')' if reasons else ''}")
    if ranges is None:
        if data is None:
            raise CalibrationError("static quantization needs calibration data or a ranges.json")
        reader = data()
        ranges = calibrate(prepared, plan, reader, act, progress=progress, total=_batches(act), data=data_label)
        ranges.channels = channels
        feeds = getattr(reader, "description", "")
        report.notes.append(f"calibrated {len(ranges.ranges)} tensors on {ranges.samples} samples "
                            f"({ranges.observer} observer){'; ' + feeds if feeds else ''}")
    reasons = _range_problems(plan, ranges)
    chosen = {u.name for u in plan.active if u.name not in reasons}
    rounding: dict[str, np.ndarray] = {}
    if act.adaround and data is None:
        report.notes.append("adaround skipped: no calibration data (ranges only)")
    elif act.adaround:
        from onnxfgq.static_adaround import optimise_rounding

        rounding, ada_notes = optimise_rounding(prepared, [u for u in plan.active if u.name in chosen], data(),
                                                progress=progress)
        report.notes += ada_notes

    def make(names: set[str], wide: Collection[str] = ()) -> ir.Model:
        return build(prepared, names, ranges, act, rounding, wide)

    def widen() -> None:  # 16-bit Q/DQ are standard from opset 21; exact for the float graph
        note = passes.upgrade_opset(prepared, WIDE_OPSET)
        if note:
            report.notes.append(note + " (to try 16-bit activations)")

    guard_reasons: dict[str, str] = {}
    wide: set[str] = set()
    budget = act.error_budget()
    if budget is not None and data is not None:
        batches = _take_samples(data(), act.guard_samples)
        guard = Guard(prepared, batches, *budget)
        chosen, wide, guard_reasons, metrics = _guard(plan, chosen, ranges, guard, progress, make,
                                                      widen if act.wide_activations else None)
        kept = len(guard_reasons) - len(wide)
        report.notes.append(
            f"accuracy guard: {budget[0]} {guard.value(metrics):.4f} vs FP32 on {_samples(batches)} calibration "
            f"samples (budget {budget[0]} >= {budget[1]}); {len(wide)} node(s) given 16-bit activations, "
            f"{kept} kept float; {guard.evaluations} evaluations")
        if not guard.ok(metrics):
            report.notes.append("accuracy guard: the budget could not be met even with every sensitive node in float")
    elif budget is not None:
        report.notes.append("accuracy guard skipped: no calibration data (ranges only)")
    qmodel = make(chosen, wide)
    reasons.update(guard_reasons)
    report.layers = _layers(plan, chosen, reasons, ranges, act, wide)
    report.seconds = time.perf_counter() - started
    return qmodel, report


def _batches(act: ActivationConfig) -> int:
    return -(-act.num_samples // act.batch_size)


def _range_problems(plan: Plan, ranges: Ranges) -> dict[str, str]:
    """Units whose tensors have no range, or whose extremes dwarf the calibrated range (outliers)."""
    problems = {}
    for u in plan.active:
        for t in u.tensors:
            if t not in ranges.ranges:
                problems[u.name] = f"no calibrated range for {t}"
                break
            lo, hi = ranges.ranges[t]
            mlo, mhi = ranges.minmax.get(t, (lo, hi))
            width = max(hi - lo, 1e-30)
            if max(abs(mlo), abs(mhi)) > OUTLIER_RATIO * width:
                problems[u.name] = (f"range of {t} is dominated by outliers (extremes {mlo:.3g}..{mhi:.3g}, "
                                    f"calibrated {lo:.3g}..{hi:.3g})")
                break
    return problems


def _proxy_noise(plan: Plan, names: set[str], ranges: Ranges) -> dict[str, float] | None:
    """Relative noise each unit adds, estimated from calibration statistics alone: the 8-bit noise of
    its activations (from their histograms) plus that of its weight. None without the statistics."""
    units = {u.name: u for u in plan.active if u.name in names}
    noise = {}
    for name, u in units.items():
        snrs = [ranges.snr_db.get(t) for t in u.tensors]
        if any(s is None for s in snrs):
            return None
        total = sum(10 ** (-s / 10) for s in snrs if np.isfinite(s))
        if u.weight_index is not None:
            total += 10 ** (-_weight_quant(u, None)[1] / 10)
        noise[name] = total
    return noise


def _guard(plan: Plan, chosen: set[str], ranges: Ranges, guard: Guard, progress: Progress,
           make: Callable[..., ir.Model], widen: Callable[[], None] | None
           ) -> tuple[set[str], set[str], dict[str, str], dict[str, float]]:
    """(quantized units, those of them with 16-bit activations, reasons, metrics): the fewest most sensitive
    units out of 8-bit activations, then (``widen`` given) the fewest of those kept float."""
    metrics = guard.measure(make(chosen))
    if guard.ok(metrics) or not chosen:
        return chosen, set(), {}, metrics
    # Measured sensitivity (the error each unit causes when it alone is quantized) while that takes few
    # evaluations; beyond, the estimate from calibration statistics (which misses how much the rest of
    # the network amplifies a tensor's noise: PP-OCR rec's first conv output, 44 dB, costs the most).
    cost = _proxy_noise(plan, chosen, ranges) if len(chosen) > MEASURED_UNITS else None
    what = "estimated 8-bit noise/signal"
    if cost is None:
        what = {"cosine": "1 - cosine", "top1": "1 - top-1 agreement"}.get(guard.metric, "noise/signal") \
            + " quantized alone"
        cost = {n: guard.deficit(guard.measure(make({n})))
                for n in progress(sorted(chosen), len(chosen), "sensitivity")}
    order = sorted(sorted(chosen), key=lambda n: -cost[n])  # ties in name order: the same run, the same bytes
    # First as many units as possible with 8-bit activations (all float trivially meets the budget) ...
    k, m = _fewest(lambda i: guard.measure(make(set(order[i:]))), len(order), guard)
    # ... then as few of the k kept float as possible: the rest get 16-bit activations (int8 weights: the
    # size), the least sensitive first. 16 bits cost the neighbours' int8 kernels too (onnxruntime has
    # no 16-bit QLinearConv), so they never replace an 8-bit unit.
    j = k
    if widen is not None and k:
        widen()
        j, m16 = _fewest(lambda i: guard.measure(make(set(order[i:]), order[i:k])), k, guard, check_zero=True)
        m = m16 if j < k else m
    reasons = {n: f"kept float by the accuracy guard: among the {k} most sensitive ({what} {cost[n]:.2e})"
               for n in order[:j]}
    reasons.update({n: f"16-bit activations by the accuracy guard: among the {k} most sensitive, not among the "
                       f"{j} kept float ({what} {cost[n]:.2e})" for n in order[j:k]})
    return set(order[j:]), set(order[j:k]), reasons, m


def _fewest(measure: Callable[[int], dict[str, float]], n: int, guard: Guard,
            check_zero: bool = False) -> tuple[int, dict[str, float]]:
    """Bisection for the smallest ``i`` in 0..n whose ``measure(i)`` meets the budget, ``measure`` being
    monotone and ``i = n`` meeting it; ``i = 0`` is tried only with ``check_zero`` (else known to miss)."""
    if check_zero:
        m = measure(0)
        if guard.ok(m):
            return 0, m
    lo, hi, best = 0, n, None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = measure(mid)
        if guard.ok(m):
            hi, best = mid, m
        else:
            lo = mid
    return hi, best if best is not None else measure(hi)


def _layers(plan: Plan, chosen: set[str], reasons: dict[str, str], ranges: Ranges,
            act: ActivationConfig, wide: Collection[str] = ()) -> list[LayerReport]:
    layers = []
    for u in plan.units:
        w = u.weight() if u.weight_index is not None and u.skip_reason is None else None
        shape = tuple(int(d) for d in w.shape) if w is not None else ()
        if u.name in chosen:
            fmt = f"qdq {act.dtype.value}" if u.name not in wide else \
                f"qdq {'int16' if act.dtype is ActivationType.INT8 else 'uint16'} activations"
            layer = LayerReport(u.name, u.node.op_type, shape, "quantized", bits=8,
                                block="channel" if w is not None else "", format=fmt,
                                algorithm=ranges.observer, reason=reasons.get(u.name, ""))
            if w is not None:
                layer.sqnr_db = _weight_quant(u, None)[1]
        else:
            layer = LayerReport(u.name, u.node.op_type, shape, "skipped",
                                reason=u.skip_reason or reasons.get(u.name, "not selected"))
        layers.append(layer)
    return layers


class LimitedReader:
    """At most ``samples`` samples of ``reader`` (the last batch cut short); sources count files or lines."""

    def __init__(self, reader: CalibrationDataReader, samples: int):
        self.reader, self.left = reader, samples
        self.description = getattr(reader, "description", "")  # how the source made its feeds

    def get_next(self):
        if self.left <= 0:
            return None
        feed = self.reader.get_next()
        if not feed:
            return feed
        n = next(iter(feed.values())).shape[0]
        if n > self.left and not getattr(self.reader, "fixed_batch", None):  # a fixed batch cannot be cut
            feed = {k: v[:self.left] for k, v in feed.items()}
            n = self.left
        self.left -= n
        return feed


def open_calibration(spec: str, model: ir.Model, act: ActivationConfig, *, tokenizer: Path | None = None,
                     dims: dict[str, int] | None = None, feeds: FeedOptions | None = None,
                     option: str = "--calibration") -> tuple[ReaderFactory | None, Ranges | None, str]:
    """(reader factory, ranges, data label) for ``spec``: a data source, or a ranges.json (whose
    recorded data source, if still readable, feeds the accuracy guard). ``feeds`` (or ``tokenizer``
    and ``dims``) shape the inputs; ``option`` names the flag in errors."""
    from onnxfgq.calibration.sources import DataSourceError, open_source

    feeds = feeds or FeedOptions()
    feeds = dataclasses.replace(feeds, dims={**feeds.dims, **(dims or {})},
                                tokenizer=Path(tokenizer) if tokenizer else feeds.tokenizer)

    ranges = None
    if spec.endswith(".json"):
        ranges = load_ranges(spec)
        spec = ranges.data
        if not spec:
            return None, ranges, ""

    def factory() -> CalibrationDataReader:
        return LimitedReader(open_source(spec, model, num_samples=act.num_samples, batch_size=act.batch_size,
                                         options=feeds, option=option), act.num_samples)

    try:
        factory()  # fail early on a bad source
    except DataSourceError:
        if ranges is None:
            raise
        return None, ranges, spec
    return factory, ranges, spec


def quantize_static_file(input_path: str | Path, output_path: str | Path, config: QuantizeConfig, *,
                         progress: Progress = _no_progress, external: bool | None = None,
                         tokenizer: Path | None = None, dims: dict[str, int] | None = None) -> Report:
    """Static int8 from file to file: written atomically, checked with onnx.checker and onnxruntime."""
    input_path, output_path = Path(input_path), Path(output_path)
    source = io.load(input_path)
    input_files = [input_path, *io.external_inputs(source)]
    io.check_output_path(output_path, input_files)
    gate = io.input_gate(input_path, source)  # before any work: refuse what cannot be validated
    act = config.activations or ActivationConfig()
    feeds = FeedOptions.from_config(config.feeds, input_path.resolve().parent)
    factory, ranges, label = open_calibration(act.calibration, source, act, tokenizer=tokenizer, dims=dims,
                                              feeds=feeds)
    model, report = quantize_static(source, config, data=factory, ranges=ranges, progress=progress,
                                    data_label=label)
    if external is None and len(input_files) > 1:
        external = True
    if gate.note:
        report.notes.append(gate.note)
    written = io.save(model, output_path, external=external, validate=lambda p: io.check(p, gate=gate))
    report.input_path, report.output_path = str(input_path), str(output_path)
    report.size_before = sum(p.stat().st_size for p in input_files)
    report.size_after = sum(Path(p).stat().st_size for p in written)
    return report


def calibrate_file(model_path: str | Path, out_path: str | Path, act: ActivationConfig, *,
                   progress: Progress = _no_progress, tokenizer: Path | None = None,
                   dims: dict[str, int] | None = None, simplify: Simplify = Simplify.AUTO) -> Ranges:
    """``onnxfgq calibrate``: ranges of every tensor static quantization would touch, as JSON."""
    source = io.load(model_path)
    factory, _, label = open_calibration(act.calibration, source, act, tokenizer=tokenizer, dims=dims,
                                         feeds=FeedOptions(model_dir=Path(model_path).resolve().parent),
                                         option="--data")
    if factory is None:
        raise CalibrationError(f"--data {act.calibration!r}: not a data source")
    prepared, _ = prepare(source, simplify, cle=act.cle)
    channels, _ = equalize_with_data(prepared, act, factory)
    plan = plan_static(prepared.graph, act.op_types, _neighbour_ops(act))
    ranges = calibrate(prepared, plan, factory(), act, progress=progress, total=_batches(act), data=label)
    ranges.channels = channels
    save_ranges(ranges, out_path)
    return ranges
