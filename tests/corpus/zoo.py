"""Third-party models the onnx wheel ships (Caffe2-era zoo CNNs, opset 9, IR 3), with real weights.

The wheel's ``light_*.onnx`` files replace every weight by ``ConstantOfShape(0.02)``: a model whose
weights are all equal says nothing about quantization (every block is constant). ``randomized``
puts random weights back as initializers, listed as graph inputs the way IR 3 requires (as the
original zoo files do), He-scaled so activations stay O(1), BatchNorm variances positive.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
       "squeezenet", "vgg19", "zfnet512")


def randomized(name: str, seed: int = 0) -> onnx.ModelProto:
    """``light_<name>.onnx`` with random weights as IR-3 initializers (also graph inputs)."""
    model = onnx.load(LIGHT / f"light_{name}.onnx")
    rng = np.random.default_rng(seed)
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, x in enumerate(node.input):
            consumers.setdefault(x, []).append((node, i))
    keep, new_inits = [], []
    for node in g.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[node.input[0]]))
        out = node.output[0]
        uses = consumers.get(out, [])
        new_inits.append(numpy_helper.from_array(_weight(rng, shape, uses), out))
    shape_names = {n.input[0] for n in g.node if n.op_type == "ConstantOfShape"}
    del g.node[:]
    g.node.extend(keep)
    kept = [t for t in g.initializer if t.name not in shape_names]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    inputs = [i for i in g.input if i.name not in shape_names]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in new_inits]
    del g.input[:]
    g.input.extend(inputs)
    _logits_out(g)
    return model


def _logits_out(g: onnx.GraphProto) -> None:
    """Drop a final Softmax: with random weights its output saturates to one-hot rows, which agree with
    anything close; the logits are what quantization must track."""
    last = g.node[-1]
    if last.op_type == "Softmax" and last.output[0] == g.output[0].name:
        g.output[0].name = last.input[0]  # Softmax keeps the shape: the declared one still holds
        del g.node[-1]


def _weight(rng, shape: tuple[int, ...], uses: list) -> np.ndarray:
    op, idx = (uses[0][0].op_type, uses[0][1]) if uses else ("", 0)
    if op == "BatchNormalization" and idx in (1, 4):  # scale, variance: positive
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if op == "BatchNormalization":
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)
    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        if op == "Gemm" and not uses[0][0].attribute:  # no transB: [K, N]
            fan_in = shape[0]
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return (rng.standard_normal(shape) * 0.05).astype(np.float32)


def input_feed(model: onnx.ModelProto, batch: int = 2, seed: int = 1) -> dict[str, np.ndarray]:
    """A random feed for the real (non-initializer) inputs."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value or batch for d in i.type.tensor_type.shape.dim]
        feed[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feed
