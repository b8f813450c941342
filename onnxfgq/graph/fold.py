"""Fold BatchNormalization into the Conv that feeds it (the arithmetic lives in ``onnxfgq.quant.static``).

A fold needs: a Conv whose weight (and bias, if any) is constant and whose output goes only to the
BatchNormalization, and constant BN parameters. Anything else is left alone and reported.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxfgq.graph.targets import add_initializer, constant_chain
from onnxfgq.quant.static import fold_batchnorm


def _const(value: ir.Value | None):
    chain = constant_chain(value)
    return None if chain is None else chain.array()


def _why_not(bn: ir.Node) -> str | None:
    x = bn.inputs[0]
    conv = x.producer() if x is not None else None
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
        return "not fed by a Conv"
    if len(x.uses()) != 1 or x.is_graph_output():
        return "the Conv output has other users"
    if conv.op_type == "ConvTranspose" and conv.attributes.get_int("group", 1) != 1:
        return "grouped ConvTranspose"
    if _const(conv.inputs[1]) is None:
        return "the Conv weight is not constant"
    if len(conv.inputs) > 2 and conv.inputs[2] is not None and _const(conv.inputs[2]) is None:
        return "the Conv bias is not constant"
    if any(_const(v) is None for v in bn.inputs[1:5]):
        return "BatchNormalization parameters are not constant"
    if any(o is not None and (o.uses() or o.is_graph_output()) for o in bn.outputs[1:]):
        return "BatchNormalization in training mode (running statistics are used)"
    return None


def fold_batchnorms(model: ir.Model) -> list[str]:
    """Fold every foldable Conv -> BatchNormalization pair in place; returns notes on those left as they are."""
    graph = model.graph
    notes = []
    for bn in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        reason = _why_not(bn)
        if reason:
            notes.append(f"BatchNormalization {bn.name or bn.outputs[0].name} not folded: {reason}")
            continue
        conv = bn.inputs[0].producer()
        w = _const(conv.inputs[1])
        b = _const(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
        gamma, beta, mean, var = (_const(v) for v in bn.inputs[1:5])
        eps = bn.attributes.get_float("epsilon", 1e-5)
        axis = 1 if conv.op_type == "ConvTranspose" else 0
        new_w, new_b = fold_batchnorm(w, b, gamma, beta, mean, var, eps, channel_axis=axis)
        base = conv.name or conv.outputs[0].name
        conv.replace_input_with(1, add_initializer(graph, f"{base}.folded_weight", new_w))
        if len(conv.inputs) < 3:
            conv.resize_inputs(3)
        conv.replace_input_with(2, add_initializer(graph, f"{base}.folded_bias", new_b))
        out, conv_out = bn.outputs[0], conv.outputs[0]
        name = out.name
        out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        conv_out.name = name
    return notes
