"""Stream intermediate tensors out of onnxruntime, batch by batch, into observers.

A copy of the model exposes the requested tensors as extra graph outputs; each batch's values go
straight to the sinks and are dropped, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common

from onnxfgq.calibration.sources import CalibrationDataReader, iterate
from onnxfgq.graph import external

Sink = Callable[[np.ndarray], None]
Progress = Callable[[Iterable, int, str], Iterable]


def _no_progress(items: Iterable, total: int, label: str) -> Iterable:
    del total, label
    return items


def infer_shapes_quietly(model: ir.Model) -> None:
    """onnx shape inference, in place, where it succeeds. Shapes are a convenience here (ORT infers
    types at load): a failure is no error, so onnx_ir's warning and traceback stay out of the run."""
    logger = logging.getLogger(common.ShapeInferencePass.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        common.ShapeInferencePass()(model)
    except Exception:  # noqa: BLE001 - the model is left as it was
        pass
    finally:
        logger.setLevel(level)


def exposing_model(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose graph outputs also include the values ``names`` (in that order)."""
    copy = model.clone()  # shares the (lazy, folder-bound) tensors; the graph is its own
    infer_shapes_quietly(copy)
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    existing = {v.name for v in copy.graph.outputs}
    for name in names:
        if name in existing:
            continue
        v = values.get(name)
        if v is None:
            raise KeyError(f"no tensor named {name!r} in the model")
        if v.type is None:
            v.type = ir.TensorType(ir.DataType.FLOAT)
        copy.graph.outputs.append(v)
    return copy


class Collector:
    """Runs ``model`` over readers and hands each requested tensor to its sinks."""

    def __init__(self, model: ir.Model, names: Sequence[str], *, intra_op_threads: int = 0):
        import onnxruntime as ort

        self.names = list(dict.fromkeys(names))
        exposed = exposing_model(model, self.names)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = intra_op_threads
        # Fusions could swallow the tensors we want to see; the float graph is what we observe.
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        # The exposed graph goes to onnxruntime as bytes; external weights are read from the model's files.
        self.session = external.session(exposed, so)
        self.model_outputs = [o.name for o in model.graph.outputs]

    def run(self, reader: CalibrationDataReader, sinks: Mapping[str, Sequence[Sink]], *,
            progress: Progress = _no_progress, total: int = 0) -> int:
        """Feed every batch of ``reader``; returns the number of batches."""
        wanted = [n for n in self.names if sinks.get(n)]
        batches = 0
        for feed in progress(iterate(reader), total, "calibrating"):
            values = self.session.run(wanted, feed)
            for name, value in zip(wanted, values):
                for sink in sinks[name]:
                    sink(value)
            batches += 1
        return batches
