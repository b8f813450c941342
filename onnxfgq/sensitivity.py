"""Measured end-to-end sensitivity: how much the model's output moves when one weight alone is
quantized one way, on a batch of calibration data.

One onnxruntime session serves every probe: the probed weights become graph inputs, so each probe
is one forward pass with one weight swapped for its fake-quantized copy (no session per probe).
The error of a probe is the relative squared error of the model's first output against the float
model's, ``|y_q - y|^2 / |y|^2``; per-layer errors add up to a good first-order estimate of the
whole model's error, which is what a bit budget should be spent against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxfgq.graph import external
from onnxfgq.graph.targets import Target


def _probe_model(model: ir.Model, roots: Sequence[ir.Value]) -> ir.Model:
    """A copy of ``model`` whose weights ``roots`` (by name) are graph inputs instead of initializers."""
    copy = model.clone()  # shares the (folder-bound) tensors
    names = {v.name for v in roots}
    for name in names:
        value = copy.graph.initializers.pop(name)
        value.const_value = None
        copy.graph.inputs.append(value)
    return copy


def probe_errors(model: ir.Model, targets: Sequence[Target], weights: Sequence[np.ndarray],
                 candidates: Sequence[Sequence[Callable[[np.ndarray], np.ndarray]]],
                 feed: dict[str, np.ndarray]) -> list[list[float]] | None:
    """``errors[i][j]``: output error with ``targets[i]``'s weight replaced by ``candidates[i][j](w)``.

    ``weights[i]`` is the weight as ``[K, N]`` (what the candidates take and return). Returns None
    when a weight is not a plain initializer read by one node (nothing was measured then).
    """
    import onnxruntime as ort

    roots = []
    for t in targets:
        root = t.chain.root
        if t.chain.ops or root.producer() is not None or root.name not in model.graph.initializers \
                or len(root.uses()) != 1:
            return None
        roots.append(root)
    probe = _probe_model(model, roots)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = external.session(probe, so)

    def layout(t: Target, w_kn: np.ndarray) -> np.ndarray:
        w = w_kn.T if t.transposed else w_kn
        return np.ascontiguousarray(w, dtype=t.chain.tensor.dtype.numpy())

    base = dict(feed)
    for t, root, w in zip(targets, roots, weights):
        base[root.name] = layout(t, w)
    ref = session.run(None, base)[0].astype(np.float64)
    signal = float(np.sum(ref * ref)) or 1.0
    errors = []
    for t, root, w, cands in zip(targets, roots, weights, candidates):
        row = []
        for fake_quant in cands:
            out = session.run(None, {**base, root.name: layout(t, fake_quant(w))})[0].astype(np.float64)
            row.append(float(np.sum((out - ref) ** 2)) / signal)
        errors.append(row)
    return errors
