#!/usr/bin/env python3
"""Write a Llama-shaped decoder with random weights, tensor by tensor, straight into external data.

    python tools/make_large_llama.py --out build/large-llama --layers 4 --hidden 2048 --ffn 5504
    python tools/make_large_llama.py --out /big/llama7b-12 --layers 12 --hidden 4096 --ffn 11008   # 10.8 GB

The graph: token embedding (Gather), per layer RMSNorm -> q/k/v MatMuls -> causal multi-head attention
(the padding mask from ``attention_mask``) -> output MatMul -> residual Add -> RMSNorm -> SwiGLU MLP
(gate, up, down) -> residual Add; final RMSNorm and an lm_head MatMul to ``logits``. No rotary
embedding and no KV cache: the shape and the weights are what memory and time depend on. Each weight
is drawn in chunks of rows (seeded, N(0, 0.02)) and appended to ``model.onnx.data``, so memory stays at
one chunk whatever the model's size; ``model.onnx`` holds only the graph.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CHUNK_ELEMENTS = 1 << 24  # 64 MiB of FP32 per draw


class ExternalWriter:
    """Appends tensors to one data file and returns initializers that point into it."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype, seed: int):
        self.path = folder / name
        self.name = name
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)

    def tensor(self, name: str, shape: tuple[int, ...], *, std: float = 0.02, value: float | None = None
               ) -> TensorProto:
        rows = shape[0]
        per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, CHUNK_ELEMENTS // per_row)
        offset = self.file.tell()
        for start in range(0, rows, step):
            n = min(step, rows - start)
            if value is not None:
                chunk = np.full((n, per_row), value, self.dtype)
            else:
                chunk = (self.rng.standard_normal((n, per_row), dtype=np.float32) * std).astype(self.dtype)
            self.file.write(chunk.tobytes())
        t = TensorProto(name=name, dims=list(shape), data_type=helper.np_dtype_to_tensor_dtype(self.dtype))
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.name), ("offset", str(offset)),
                         ("length", str(self.file.tell() - offset))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        return t

    def close(self) -> None:
        self.file.close()


def build(out: Path, *, layers: int, hidden: int, ffn: int, vocab: int, heads: int, dtype: str = "fp32",
          seed: int = 0) -> Path:
    if hidden % heads:
        raise SystemExit(f"--hidden {hidden} is not a multiple of --heads {heads}")
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float16 if dtype == "fp16" else np.float32
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))
    head = hidden // heads
    w = ExternalWriter(out, "model.onnx.data", np_dtype, seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value, dt=np.int64) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dt), name))
        return name

    def node(op: str, inputs: list[str], out_name: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out_name], name=out_name, **attrs))
        return out_name

    def rms_norm(x: str, prefix: str) -> str:
        inits.append(w.tensor(f"{prefix}.weight", (hidden,), value=1.0))
        sq = node("Mul", [x, x], f"{prefix}/sq")
        mean = node("ReduceMean", [sq, "axes_last"], f"{prefix}/mean", keepdims=1)
        rstd = node("Reciprocal", [node("Sqrt", [node("Add", [mean, "eps"], f"{prefix}/add")], f"{prefix}/sqrt")],
                    f"{prefix}/rstd")
        return node("Mul", [node("Mul", [x, rstd], f"{prefix}/norm"), f"{prefix}.weight"], f"{prefix}/out")

    def linear(x: str, name: str, k: int, n: int) -> str:
        inits.append(w.tensor(f"{name}.weight", (k, n)))
        return node("MatMul", [x, f"{name}.weight"], f"{name}/out")

    const("axes_last", [-1])
    const("eps", 1e-5, np_dtype)
    const("heads_shape", [0, 0, heads, head])
    const("merge_shape", [0, 0, hidden])
    const("scale", 1.0 / np.sqrt(head), np_dtype)
    const("neg", -1e4 if dtype == "fp16" else -1e9, np_dtype)
    const("one", 1.0, np_dtype)
    # additive mask [batch, 1, seq, seq]: causal and padding, from the graph inputs only
    seq_shape = node("Shape", ["input_ids"], "mask/shape")
    seq = node("Gather", [seq_shape, const("one_idx", [1])], "mask/seq")
    square = node("Concat", [seq, seq], "mask/square", axis=0)
    ones = node("ConstantOfShape", [square], "mask/ones", value=helper.make_tensor("v", onnx_dtype, [1], [1.0]))
    causal = node("Trilu", [ones], "mask/causal", upper=0)
    pad = node("Cast", [node("Unsqueeze", ["attention_mask", const("axes_12", [1, 2])], "mask/unsq")],
               "mask/pad", to=onnx_dtype)
    keep = node("Mul", [causal, pad], "mask/keep")
    mask = node("Mul", [node("Sub", ["one", keep], "mask/drop"), "neg"], "mask/additive")

    inits.append(w.tensor("embed_tokens.weight", (vocab, hidden)))
    x = node("Gather", ["embed_tokens.weight", "input_ids"], "embed/out")
    for i in range(layers):
        p = f"layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm")
        q, k, v = (node("Transpose", [node("Reshape", [linear(h, f"{p}.self_attn.{n}_proj", hidden, hidden),
                                                        "heads_shape"], f"{p}/{n}/heads")],
                        f"{p}/{n}/t", perm=[0, 2, 1, 3]) for n in "qkv")
        kt = node("Transpose", [k], f"{p}/k/tt", perm=[0, 1, 3, 2])
        scores = node("Add", [node("Mul", [node("MatMul", [q, kt], f"{p}/qk"), "scale"], f"{p}/scaled"), mask],
                      f"{p}/masked")
        ctx = node("MatMul", [node("Softmax", [scores], f"{p}/probs", axis=-1), v], f"{p}/ctx")
        merged = node("Reshape", [node("Transpose", [ctx], f"{p}/ctx/t", perm=[0, 2, 1, 3]), "merge_shape"],
                      f"{p}/merged")
        x = node("Add", [x, linear(merged, f"{p}.self_attn.o_proj", hidden, hidden)], f"{p}/attn_residual")
        h = rms_norm(x, f"{p}.post_attention_layernorm")
        gate = linear(h, f"{p}.mlp.gate_proj", hidden, ffn)
        silu = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu")
        up = linear(h, f"{p}.mlp.up_proj", hidden, ffn)
        down = linear(node("Mul", [silu, up], f"{p}/swiglu"), f"{p}.mlp.down_proj", ffn, hidden)
        x = node("Add", [x, down], f"{p}/mlp_residual")
    logits = linear(rms_norm(x, "norm"), "lm_head", hidden, vocab)
    nodes[-1].output[0] = "logits"
    w.close()
    graph = helper.make_graph(
        nodes, "large_llama",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", onnx_dtype, ["batch", "seq", vocab])], inits)
    del logits
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="make_large_llama")
    path = out / "model.onnx"
    onnx.save(model, path)  # the initializers are references: the proto is the graph only
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for model.onnx + model.onnx.data")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build(args.out, layers=args.layers, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab,
                 heads=args.heads, dtype=args.dtype, seed=args.seed)
    size = os.path.getsize(path) + os.path.getsize(path.parent / "model.onnx.data")
    print(f"wrote {path} (+ model.onnx.data): {size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
