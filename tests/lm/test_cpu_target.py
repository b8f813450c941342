"""--target cpu: accuracy_level 4 (zero points kept) unless a flag says otherwise; the report suggests it."""

from __future__ import annotations

import pytest

from onnxfgq.api import quantize
from onnxfgq.cli import build_parser, config_from_args
from tests.helpers import mlp


@pytest.mark.parametrize("flags, level, zero_points", [
    ((), 0, True),
    (("--target", "cpu"), 4, True),
    (("--target", "cpu", "--symmetric"), 4, False),
    (("--target", "cpu", "--accuracy-level", "0"), 0, True),
])
def test_target_cpu_preset(flags, level, zero_points):
    config = config_from_args(build_parser().parse_args(["quantize", "m.onnx", *flags]))
    res = quantize(mlp(k=256, hidden=256, n=64), config)
    nodes = [n for n in res.model.graph if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(n.attributes.get_int("accuracy_level") == level for n in nodes)
    assert all((len(n.inputs) >= 4 and n.inputs[3] is not None) == zero_points for n in nodes)
    hinted = any("--target cpu" in note for note in res.report.notes)
    assert hinted == (level != 4)  # the report suggests the fast setting when it is not used
