"""Static int8's rounding pass (``ActivationConfig.adaround``): per weighted unit, the input's second
moment ``H`` is accumulated over the calibration data (streamed: a bounded sample of rows or Conv
patches per batch), then :func:`onnxfgq.algorithms.adaround.adaround` picks the int8 codes that
minimise the unit's output error. The codes replace round-to-nearest in ``static.build``; scales are
unchanged. This module reads the graph (which tensor, which Conv geometry); the math is in
``onnxfgq.algorithms.adaround``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from onnxfgq.algorithms.adaround import AdaRoundOptions, GroupGram, adaround, conv_patches, output_error
from onnxfgq.calibration.collect import Collector
from onnxfgq.graph.qdq_static import Unit
from onnxfgq.quant.static import WEIGHT_QMAX, per_channel_scale

ROWS_PER_BATCH = 512  # input rows (Conv patches) sampled per calibration batch and unit: bounds memory and time


def weight_rows(unit: Unit) -> np.ndarray:
    """The weight as ``[C_out, K]`` rows in the order of the input rows (Conv: (channel, kh, kw))."""
    w = unit.weight().astype(np.float32)
    return np.moveaxis(w, unit.weight_axis, 0).reshape(w.shape[unit.weight_axis], -1)


def _from_rows(rows: np.ndarray, unit: Unit) -> np.ndarray:
    shape = unit.weight().shape
    moved = (shape[unit.weight_axis],) + tuple(d for i, d in enumerate(shape) if i != unit.weight_axis)
    return np.moveaxis(rows.reshape(moved), 0, unit.weight_axis)


def _row_source(unit: Unit) -> tuple[Callable[[np.ndarray, np.random.Generator], np.ndarray] | None, str]:
    """(batch -> rows ``[n, G, K]``, '') for the unit's input, or (None, why not)."""
    node, op = unit.node, unit.node.op_type
    w = unit.weight()
    if op == "Conv":
        if w.ndim != 4:
            return None, f"{w.ndim - 2}-D Conv (2-D only)"
        if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return None, "Conv with auto_pad"
        attr = node.attributes
        kernel = tuple(w.shape[2:])
        strides = tuple(attr.get_ints("strides", (1, 1)) or (1, 1))
        pads = tuple(attr.get_ints("pads", (0, 0, 0, 0)) or (0, 0, 0, 0))
        dil = tuple(attr.get_ints("dilations", (1, 1)) or (1, 1))
        group = attr.get_int("group", 1)
        return (lambda x, rng: conv_patches(x, kernel, strides, pads, dil, group, ROWS_PER_BATCH, rng)), ""
    if op in ("MatMul", "Gemm") and w.ndim == 2:
        def rows(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            flat = x.reshape(-1, x.shape[-1])
            if len(flat) > ROWS_PER_BATCH:
                flat = flat[np.sort(rng.choice(len(flat), ROWS_PER_BATCH, replace=False))]
            return flat[:, None, :]
        return rows, ""
    return None, f"{op} (Conv, MatMul and Gemm only)"


class _Sink:
    def __init__(self, rows: Callable, seed: int):
        self.rows, self.rng, self.gram = rows, np.random.default_rng(seed), GroupGram()

    def __call__(self, x: np.ndarray) -> None:
        self.gram.update(self.rows(np.asarray(x), self.rng))


def optimise_rounding(prepared: ir.Model, units: Iterable[Unit], reader, *,
                      options: AdaRoundOptions = AdaRoundOptions(),
                      progress=lambda items, total, label: items) -> tuple[dict[str, np.ndarray], list[str]]:
    """int8 codes (in each weight's own layout) for the weighted ``units``, and notes for the report."""
    units = [u for u in units if u.weight_index is not None and u.inputs]
    sinks, notes, skipped = {}, [], []
    for i, u in enumerate(units):
        rows, why = _row_source(u)
        if rows is None:
            skipped.append(f"{u.name}: {why}")
        else:
            sinks[u.name] = _Sink(rows, seed=i)  # seeded per unit: the same data, the same codes
    if not sinks:
        return {}, ["adaround: no unit it applies to" + (f" ({'; '.join(skipped)})" if skipped else "")]
    by_tensor: dict[str, list[_Sink]] = {}
    for u in units:
        if u.name in sinks:
            by_tensor.setdefault(u.inputs[0], []).append(sinks[u.name])
    started = time.perf_counter()
    Collector(prepared, list(by_tensor)).run(reader, by_tensor)
    codes, gains = {}, []
    for u in progress([u for u in units if u.name in sinks], len(sinks), "adaround"):
        sink = sinks[u.name]
        if not sink.gram.rows:
            skipped.append(f"{u.name}: no input rows observed")
            continue
        w = weight_rows(u)
        h = sink.gram.hessian()
        scale = per_channel_scale(w, 0).reshape(-1)
        if w.shape[0] % h.shape[0] or h.shape[1] != w.shape[1]:
            skipped.append(f"{u.name}: weight {w.shape} does not match its input's {h.shape[0]} x {h.shape[1]} rows")
            continue
        q = adaround(w, scale, h, -WEIGHT_QMAX, WEIGHT_QMAX, options)
        nearest = np.clip(np.round(w / scale[:, None]), -WEIGHT_QMAX, WEIGHT_QMAX)
        before = output_error(w, nearest * scale[:, None], h)
        after = output_error(w, q * scale[:, None], h)
        gains.append(after / before if before > 0 else 1.0)
        codes[u.name] = _from_rows(q, u).astype(np.int8)
    if gains:
        notes.append(f"adaround: {len(codes)} weights' rounding optimised on their calibrated inputs "
                     f"({options.iterations} iterations); output error vs nearest rounding: median "
                     f"{float(np.median(gains)):.3f}x, worst {max(gains):.3f}x; {time.perf_counter() - started:.0f} s")
    if skipped:
        notes.append("adaround kept nearest rounding for " + "; ".join(skipped))
    return codes, notes
