#!/usr/bin/env python3
"""Benchmark com.onnxfgq::MatMulBlockQuant against ORT's MatMulNBits and an FP32 MatMul.

CPU (always): three tiny ONNX models run in onnxruntime sessions with the same thread count:
  ours  - com.onnxfgq::MatMulBlockQuant (this repo's library), int4, uint8 zero points
  mlas  - com.microsoft::MatMulNBits (MLAS), int4, packed zero points, accuracy_level 0
  fp32  - a plain MatMul with the dequantised float weights
Each model holds several copies of its weights (independent nodes fed by the same A), so the
weights do not sit in the 32 MiB L3 between runs; A rotates among several buffers. Times are
per node (run time / copies), medians over repeats.

GPU (when torch.cuda is available): the library's C entry point on CUDA tensors vs torch.matmul
in fp16 (cuBLAS) vs the time to read the packed weights once at the device's bandwidth.

    python tools/bench_kernels.py --quick          # M in {1, 8}, K x N = 4096 x 4096, block 128
    python tools/bench_kernels.py                  # the full sweep
    python tools/bench_kernels.py --m 1 8 --block-sizes 32 128
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxfgq import ops
from onnxfgq.quant.bitstream import pack_bitstream

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BITS = 4


def make_quantized(rng, n, k, block_size):
    g = -(-k // block_size)
    codes = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    scales = (rng.random((n, g), dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    zp = rng.integers(0, 16, size=(n, g), dtype=np.uint8)
    return codes, scales, zp


def dequantize(codes, scales, zp, block_size):
    group = np.arange(codes.shape[1]) // block_size
    return ((codes.astype(np.float32) - zp[:, group]) * scales[:, group]).astype(np.float32)


def pack_matmulnbits(codes, zp, block_size):
    """B [N, n_blocks, block_size/2] (low nibble first) and zero points [N, ceil(n_blocks/2)]."""
    n, k = codes.shape
    g = -(-k // block_size)
    padded = np.zeros((n, g * block_size), dtype=np.uint8)
    padded[:, :k] = codes
    pairs = padded.reshape(n, g, block_size // 2, 2)
    b = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
    zp_padded = np.zeros((n, 2 * (-(-g // 2))), dtype=np.uint8)
    zp_padded[:, :g] = zp
    zp_pairs = zp_padded.reshape(n, -1, 2)
    return b, (zp_pairs[..., 0] | (zp_pairs[..., 1] << 4)).astype(np.uint8)


def build_model(kind, m, k, n, block_size, copies, rng):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    for c in range(copies):
        codes, scales, zp = make_quantized(rng, n, k, block_size)
        y = f"Y{c}"
        outputs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [m, n]))
        if kind == "ours":
            inits += [numpy_helper.from_array(pack_bitstream(codes, BITS), f"B{c}"),
                      numpy_helper.from_array(scales, f"S{c}"), numpy_helper.from_array(zp, f"Z{c}")]
            nodes.append(helper.make_node(ops.OP_TYPE, ["A", f"B{c}", f"S{c}", f"Z{c}"], [y], domain=ops.DOMAIN,
                                          K=k, N=n, bits=BITS, block_size=block_size))
        elif kind == "mlas":
            b, zp_packed = pack_matmulnbits(codes, zp, block_size)
            inits += [numpy_helper.from_array(b, f"B{c}"), numpy_helper.from_array(scales.reshape(-1), f"S{c}"),
                      numpy_helper.from_array(zp_packed.reshape(-1), f"Z{c}")]
            nodes.append(helper.make_node("MatMulNBits", ["A", f"B{c}", f"S{c}", f"Z{c}"], [y],
                                          domain="com.microsoft", K=k, N=n, bits=BITS, block_size=block_size,
                                          accuracy_level=0))
        else:
            w = dequantize(codes, scales, zp, block_size)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"W{c}"))
            nodes.append(helper.make_node("MatMul", ["A", f"W{c}"], [y]))
    graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
                              outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
              helper.make_opsetid(ops.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


def cpu_session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    ops.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def time_sessions(sessions, inputs, repeats, rounds=5):
    """Median seconds per run of each session. Sessions take turns in rounds (a few runs each,
    the first of a turn discarded, as the previous session's pool threads may still spin), so
    that slow phases of this shared machine hit all of them alike."""
    samples = {name: [] for name in sessions}
    per_turn = max(2, -(-repeats // rounds))
    i = 0
    for _ in range(rounds):
        for name, sess in sessions.items():
            for j in range(per_turn + 1):
                feed = {"A": inputs[i % len(inputs)]}
                i += 1
                t0 = time.perf_counter()
                sess.run(None, feed)
                if j:
                    samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def copies_for(weight_bytes):
    """Enough copies that one run streams >= 96 MiB of weights (3x the L3), at most 8."""
    return int(min(8, max(2, -(-96 * 2**20 // weight_bytes))))


def bench_cpu(args):
    rng = np.random.default_rng(0)
    print(f"CPU: onnxruntime {__import__('onnxruntime').__version__}, intra_op_num_threads={args.threads} for "
          f"all three, int4 with zero points, times per node in ms (median of >= {args.repeats} runs)")
    header = (f"{'M':>4} {'K':>6} {'N':>6} {'bs':>4} | {'ours':>8} {'mlas':>8} {'fp32':>8} | "
              f"{'ours/mlas':>9} {'fp32/ours':>9} {'fp32/mlas':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for k, n in args.shapes:
        for bs in args.block_sizes:
            for m in args.m:
                inputs = [rng.standard_normal((m, k)).astype(np.float32) for _ in range(4)]
                sessions, copies = {}, {}
                for kind in ("ours", "mlas", "fp32"):
                    copies[kind] = copies_for(n * k * (4 if kind == "fp32" else 0.5))
                    sessions[kind] = cpu_session(build_model(kind, m, k, n, bs, copies[kind], rng), args.threads)
                medians = time_sessions(sessions, inputs, args.repeats)
                times = {kind: medians[kind] / copies[kind] * 1e3 for kind in sessions}
                del sessions
                row = (m, k, n, bs, times["ours"], times["mlas"], times["fp32"])
                rows.append(row)
                print(f"{m:>4} {k:>6} {n:>6} {bs:>4} | {times['ours']:8.3f} {times['mlas']:8.3f} "
                      f"{times['fp32']:8.3f} | {times['ours'] / times['mlas']:9.2f} "
                      f"{times['fp32'] / times['ours']:9.2f} {times['fp32'] / times['mlas']:9.2f}", flush=True)
    return rows


def bench_gpu(args):
    import torch

    lib = ctypes.CDLL(str(ops.library_path()))
    fn = lib.onnxfgq_cuda_matmul_block_quant
    fn.restype = ctypes.c_int
    ptr = ctypes.c_void_p
    fn.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_int64, ctypes.c_int, ptr]
    props = torch.cuda.get_device_properties(0)
    # Theoretical DRAM bandwidth is not exposed by torch; measure a device-to-device copy instead.
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(big)
    torch.cuda.synchronize()
    bandwidth = 2 * big.numel() * 10 / (time.perf_counter() - t0)
    print(f"GPU: {props.name}, copy bandwidth {bandwidth / 1e9:.0f} GB/s; fp16, int4 with uint8 zero points, ms")
    print(f"{'M':>4} {'K':>6} {'N':>6} {'bs':>4} | {'ours':>8} {'cublas':>8} {'bw-limit':>8} | {'cublas/ours':>11}")
    rng = np.random.default_rng(0)
    stream = torch.cuda.current_stream().cuda_stream
    for k, n in args.shapes:
        for bs in args.block_sizes:
            codes, scales, zp = make_quantized(rng, n, k, bs)
            b = torch.from_numpy(pack_bitstream(codes, BITS)).cuda()
            s = torch.from_numpy(scales).half().cuda()
            z = torch.from_numpy(zp).cuda()
            w = torch.from_numpy(dequantize(codes, scales, zp, bs)).half().cuda()
            for m in args.m:
                a = torch.randn(m, k, dtype=torch.float16, device="cuda")
                y = torch.empty(m, n, dtype=torch.float16, device="cuda")

                def ours(a=a, y=y, s=s, z=z, b=b, m=m, k=k, n=n, bs=bs):
                    rc = fn(a.data_ptr(), b.data_ptr(), s.data_ptr(), z.data_ptr(), 1, None, y.data_ptr(),
                            m, k, n, BITS, bs, 10, stream)
                    assert rc == 0, rc

                def cublas(a=a, w=w):
                    torch.matmul(a, w.T)

                res = {}
                for name, f in (("ours", ours), ("cublas", cublas)):
                    for _ in range(3):
                        f()
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    reps = 50
                    start.record()
                    for _ in range(reps):
                        f()
                    end.record()
                    torch.cuda.synchronize()
                    res[name] = start.elapsed_time(end) / reps
                limit = (b.numel() + s.numel() * 2 + z.numel() + a.numel() * 2 + y.numel() * 2) / bandwidth * 1e3
                print(f"{m:>4} {k:>6} {n:>6} {bs:>4} | {res['ours']:8.3f} {res['cublas']:8.3f} {limit:8.3f} | "
                      f"{res['cublas'] / res['ours']:11.2f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="M in {1, 8}, 4096x4096, block 128")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 128, 512])
    parser.add_argument("--shapes", type=str, nargs="+", default=None, help="KxN, e.g. 4096x11008")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per model")
    parser.add_argument("--device", choices=["cpu", "gpu", "all"], default="all")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes] if args.shapes else SHAPES
    if args.quick:
        args.m, args.shapes, args.block_sizes = [1, 8], [(4096, 4096)], [128]
    print("command: python tools/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.device in ("cpu", "all"):
        bench_cpu(args)
    if args.device in ("gpu", "all"):
        try:
            import torch
            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if has_gpu:
            bench_gpu(args)
        else:
            print("GPU: skipped (torch.cuda.is_available() is False)")


if __name__ == "__main__":
    main()
