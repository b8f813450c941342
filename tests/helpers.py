"""Small hand-built ONNX models, an onnxruntime runner and the command line as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``onnxfgq ARGS`` in a new process (from ``cwd``), offline, with the repository's models/ importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "onnxfgq.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


def run(model: onnx.ModelProto | str | Path, feed: dict, *, qdq_exact: bool = True, custom_ops: bool = False):
    """Run a model on CPU; ``qdq_exact`` keeps DQ+MatMul in float (no int8-activation fusion)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if qdq_exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if custom_ops:
        from onnxfgq import ops

        ops.register(so)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feed)


def mlp(k: int = 123, hidden: int = 96, n: int = 40, *, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul(W1) -> Relu -> Gemm(W2^T, transB=1, bias) -> y, with K not a multiple of 32."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, hidden)) / np.sqrt(k)).astype(np.float32)
    w2 = (rng.standard_normal((n, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = rng.standard_normal(n).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def messy(seed: int = 1) -> onnx.ModelProto:
    """Weights reached through a Constant node, an Identity chain, a Transpose, a shared weight,
    and one computed by Reshape of an initializer (only constant folding exposes it)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    wt = (rng.standard_normal((48, 64)) / 8).astype(np.float32)  # used transposed: [64, 48] after Transpose
    flat = (rng.standard_normal(64 * 32) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["wc"], value=numpy_helper.from_array(w, "wc_value"), name="const"),
        helper.make_node("Identity", ["wc"], ["wc1"], name="id1"),
        helper.make_node("Identity", ["wc1"], ["wc2"], name="id2"),
        helper.make_node("MatMul", ["x", "wc2"], ["a"], name="mm_const"),
        helper.make_node("MatMul", ["a", "wc"], ["b"], name="mm_shared"),  # same weight again
        helper.make_node("Transpose", ["wt"], ["wtt"], perm=[1, 0], name="tr"),
        helper.make_node("MatMul", ["b", "wtt"], ["c"], name="mm_transposed"),
        helper.make_node("Reshape", ["flat", "shape"], ["wr"], name="reshape_w"),
        helper.make_node("MatMul", ["x", "wr"], ["d"], name="mm_reshaped"),
    ]
    graph = helper.make_graph(
        nodes, "messy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["batch", 48]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(flat, "flat"),
         numpy_helper.from_array(np.array([64, 32], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def write_large_model(path: Path, *, k: int = 8192, n: int = 24576, layers: int = 3, seed: int = 0) -> int:
    """A chain of ``layers`` MatMuls with [k, n] / [n, k] weights stored as external data, written
    one weight at a time (never the whole model in memory). Returns the bytes of weights."""
    rng = np.random.default_rng(seed)
    data_name = path.name + ".data"
    initializers, nodes = [], []
    offset = 0
    with open(path.parent / data_name, "wb") as f:
        for i in range(layers):
            shape = (k, n) if i % 2 == 0 else (n, k)
            rows_per_chunk = max(1, (64 << 20) // (shape[1] * 4))
            for start in range(0, shape[0], rows_per_chunk):
                rows = min(rows_per_chunk, shape[0] - start)
                chunk = rng.standard_normal((rows, shape[1]), dtype=np.float32) / np.float32(np.sqrt(shape[0]))
                f.write(chunk.tobytes())
            length = shape[0] * shape[1] * 4
            t = onnx.TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=list(shape))
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            initializers.append(t)
            offset += length
            nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"))
    out_dim = n if layers % 2 else k
    graph = helper.make_graph(
        nodes, "large", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["batch", out_dim])], initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return offset


def write_npz_batches(folder: Path, batches, name: str = "x") -> Path:
    """A calibration folder: one ``i.npz`` per batch, holding input ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(batches):
        np.savez(folder / f"{i}.npz", **{name: x})
    return folder
