"""Shared constants and small graph predicates of the rotation pass."""

from __future__ import annotations

import onnx_ir as ir

from onnxfgq.graph.targets import constant_chain

_DEFAULT = ("", "ai.onnx")
_MS = ("com.microsoft",)
_SAME = ("Cast", "Identity")  # stream-preserving
_LAYOUT = ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")


class RotateError(ValueError):
    """Why a rotation cannot be applied to this graph (the report names the node)."""


class _GraphOutput(RotateError):
    """A value the rotation would change is a graph output."""


def _op(node: ir.Node | None, *ops: str, domains: tuple[str, ...] = _DEFAULT) -> bool:
    return node is not None and node.op_type in ops and node.domain in domains


def _label(node: ir.Node) -> str:
    return f"{node.op_type} {node.name or node.outputs[0].name!r}"


def _scalar(value: ir.Value | None) -> float | None:
    chain = constant_chain(value)
    if chain is None:
        return None
    a = chain.array()
    return float(a.reshape(-1)[0]) if a.size == 1 else None


def _last_axis_only(node: ir.Node) -> bool:
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        chain = constant_chain(node.inputs[1])
        axes = None if chain is None else [int(a) for a in chain.array().reshape(-1)]
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1)) \
        and node.attributes.get_int("keepdims", 1) == 1


def _last_dim(value: ir.Value) -> int | None:
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return int(value.shape[-1])
    return None
