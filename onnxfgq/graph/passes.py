"""Whole-graph passes used around the rewrite: opset upgrades and clean-up."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from onnxfgq.graph import external, sanity


def default_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def upgrade_opset(model: ir.Model, target: int) -> str | None:
    """Raise the default-domain opset to ``target`` (no-op if already there); returns a note."""
    current = default_opset(model)
    if current >= target:
        return None
    import onnx.version_converter

    # onnx's converter covers every op's adapter (onnxscript's skips e.g. ReduceL2's axes move).
    # Initializers are serialised as references where they are external, so this stays cheap.
    upgraded = external.rebuild(model, lambda proto: onnx.version_converter.convert_version(proto, target))
    sanity.keep_io_shapes(model.graph, upgraded.graph)
    model.graph = upgraded.graph  # the graph carries the opset imports
    return f"upgraded the model's opset from {current} to {target}"


def remove_unused(model: ir.Model) -> None:
    common.RemoveUnusedNodesPass()(model)
