"""Measured end-to-end sensitivity: how much the model's output moves when one weight alone is
quantized one way, on a batch of calibration data.

One onnxruntime session serves every probe: the probed weights become graph inputs, so each probe
is one forward pass with one weight swapped for its fake-quantized copy (no session per probe).
The error of a probe is, by default, the relative squared error of the model's first output against
the float model's, ``|y_q - y|^2 / |y|^2``. For a causal LM (``logits`` given: the output its lm_head
produces) it is the mean KL divergence of the quantized next-token distribution from the float one,
over the positions the attention mask keeps: the expected increase of the negative log-likelihood
on text the float model predicts well, i.e. the log of the perplexity ratio to first order. Squared
logit errors would weigh every vocabulary entry alike, most of which have no probability. Per-layer
errors add up to a first-order estimate of the whole model's error, which is what a bit budget should
be spent against.
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
                 feed: dict[str, np.ndarray], *, logits: str | None = None) -> list[list[float]] | None:
    """``errors[i][j]``: output error with ``targets[i]``'s weight replaced by ``candidates[i][j](w)``.

    ``weights[i]`` is the weight as ``[K, N]`` (what the candidates take and return). ``logits``: the
    name of a causal LM's logits output, measured as KL divergence (see the module's doc). Returns
    None when a weight is not a plain initializer read by one node (nothing was measured then).
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
    outputs = [logits] if logits else None
    ref = session.run(outputs, base)[0].astype(np.float64)
    distortion = _kl_divergence(ref, feed.get("attention_mask")) if logits else _relative_squared_error(ref)
    errors = []
    for t, root, w, cands in zip(targets, roots, weights, candidates):
        row = []
        for fake_quant in cands:
            out = session.run(outputs, {**base, root.name: layout(t, fake_quant(w))})[0]
            row.append(distortion(out.astype(np.float64)))
        errors.append(row)
    return errors


def _relative_squared_error(ref: np.ndarray) -> Callable[[np.ndarray], float]:
    signal = float(np.sum(ref * ref)) or 1.0
    return lambda out: float(np.sum((out - ref) ** 2)) / signal


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl_divergence(ref: np.ndarray, mask: np.ndarray | None) -> Callable[[np.ndarray], float]:
    """Mean ``KL(p_ref || p_out)`` over the positions of ``[..., T, vocab]`` logits the ``[B, T]``
    attention mask keeps (all positions without a mask of that shape)."""
    log_p = _log_softmax(ref)
    p = np.exp(log_p)
    keep = None
    if mask is not None and np.shape(mask) == ref.shape[:-1]:
        keep = np.asarray(mask) != 0

    def kl(out: np.ndarray) -> float:
        per_position = np.sum(p * (log_p - _log_softmax(out)), axis=-1)
        if not np.all(np.isfinite(per_position)):
            return float("inf")
        if keep is not None:
            return float(per_position[keep].mean()) if keep.any() else 0.0
        return float(per_position.mean())

    return kl
