"""Graph side of AWQ: divide a MatMul input by a per-channel scale ``s``.

The weights that read the tensor are quantized as ``diag(s) W`` by the caller; this pass makes the
activations ``x / s`` so that the float function is unchanged. Where the tensor comes from a
LayerNormalization whose output feeds only those weights, ``1/s`` goes into its gamma and beta (free
at run time); otherwise one ``Mul`` is inserted between the tensor and those consumers (the
tensor's other readers, such as a residual Add, keep the unscaled value).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxfgq.graph.targets import Target, constant_chain


def _float_dtype(value: ir.Value) -> np.dtype:
    dtype = value.type.dtype if value.type is not None else ir.DataType.FLOAT
    return np.dtype(np.float16) if dtype == ir.DataType.FLOAT16 else np.dtype(np.float32)


def _sole_constant(value: ir.Value | None) -> bool:
    """A constant initializer (no producer) used by one node only: safe to rewrite in place."""
    return (value is not None and value.producer() is None and value.const_value is not None
            and len(value.uses()) == 1)


def _fold_into_layernorm(value: ir.Value, inv: np.ndarray) -> str | None:
    node = value.producer()
    if node is None or node.op_type != "LayerNormalization" or node.outputs[0] is not value:
        return None
    if node.attributes.get_int("axis", -1) not in (-1, len(value.shape or ()) - 1) and value.shape is not None:
        return None
    gamma = node.inputs[1] if len(node.inputs) > 1 else None
    beta = node.inputs[2] if len(node.inputs) > 2 else None
    if not _sole_constant(gamma) or (beta is not None and not _sole_constant(beta)):
        return None
    g = gamma.const_value.numpy()
    if g.shape != inv.shape:
        return None
    gamma.const_value = ir.tensor((g * inv).astype(g.dtype), name=gamma.name)
    if beta is not None:
        b = beta.const_value.numpy()
        beta.const_value = ir.tensor((b * inv).astype(b.dtype), name=beta.name)
    return f"folded into {node.name or 'LayerNormalization'}"


def apply_input_scale(graph: ir.Graph, value: ir.Value, consumers: Sequence[ir.Node], scale: np.ndarray) -> str:
    """Make ``consumers`` read ``value / scale`` (``scale`` over the last axis); returns what was done."""
    inv = (1.0 / np.asarray(scale, np.float64)).astype(_float_dtype(value))
    consumer_set = {id(n) for n in consumers}
    # Shape (and Size) readers see the same shape in x / s: they do not stop a fold.
    only_ours = all(id(use.node) in consumer_set or use.node.op_type in ("Shape", "Size")
                    for use in value.uses()) and not any(value is out for out in graph.outputs)
    if only_ours:
        note = _fold_into_layernorm(value, inv)
        if note:
            return note
    name = (value.name or "x") + "_awq"
    const = ir.Value(name=name + "_inv_scale", shape=ir.Shape(inv.shape), type=ir.TensorType(ir.DataType.FLOAT16 if
                     inv.dtype == np.float16 else ir.DataType.FLOAT), const_value=ir.tensor(inv))
    graph.register_initializer(const)
    mul = ir.node("Mul", [value, const], name=name + "_Mul")
    mul.outputs[0].name = name
    mul.outputs[0].type = value.type
    mul.outputs[0].shape = value.shape
    first = min(consumers, key=lambda n: list(graph).index(n))
    graph.insert_before(first, mul)
    for node in consumers:
        for i, inp in enumerate(node.inputs):
            if inp is value:
                node.replace_input_with(i, mul.outputs[0])
    return "inserted Mul"


def scale_float_weight(graph: ir.Graph, target: Target, scale: np.ndarray) -> None:
    """Replace ``target``'s float weight by ``diag(scale) W`` (for checking a fold without quantizing).
    The weight must be a plain initializer that no other node reads."""
    chain = constant_chain(target.node.inputs[target.input_index])
    if chain is None or chain.ops or len(chain.root.uses()) != 1:
        raise ValueError(f"{target.name}: weight is shared or reached through ops; cannot scale in place")
    w = chain.tensor.numpy()
    s = np.asarray(scale, w.dtype)
    w = w * (s[None, :] if target.transposed else s[:, None])
    chain.root.const_value = ir.tensor(w.astype(chain.tensor.dtype.numpy()), name=chain.root.name)
