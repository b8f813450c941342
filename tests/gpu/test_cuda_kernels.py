"""CUDA kernels of com.onnxfgq::MatMulBlockQuant against a float64 numpy reference.

The kernels are called through the library's C entry point on torch CUDA tensors (ctypes), so
no onnxruntime-gpu is needed; a last test runs the op in onnxruntime's CUDA provider when that
provider is installed. Everything skips cleanly on machines without a CUDA GPU.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from onnxfgq import ops
from onnxfgq.quant.bitstream import pack_bitstream

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

ZP_KIND = {None: 0, "uint8": 1, "float": 2}
DTYPE_CODE = {np.float32: 1, np.float16: 10}
TORCH_DTYPE = {np.float32: torch.float32, np.float16: torch.float16}


@pytest.fixture(scope="module")
def entry_point():
    try:
        lib = ctypes.CDLL(str(ops.library_path()))
    except (ops.OpsLibraryError, OSError) as exc:
        pytest.skip(f"custom-op library not available: {exc}")
    try:
        fn = lib.onnxfgq_cuda_matmul_block_quant
    except AttributeError:
        pytest.skip("the library was built without CUDA kernels (nvcc missing at build time)")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    return fn


def reference(a, codes, scales, zp, bias, bits, block_size):
    group = np.arange(codes.shape[1]) // block_size
    zp64 = np.full(scales.shape, float(1 << (bits - 1))) if zp is None else zp.astype(np.float64)
    w = (codes - zp64[:, group]) * scales.astype(np.float64)[:, group]
    y = a.astype(np.float64) @ w.T
    return y if bias is None else y + bias.astype(np.float64)


def run_case(fn, *, m, n, k, bits, block_size, dtype=np.float32, zp_kind="uint8", with_bias=True, seed=0):
    rng = np.random.default_rng(seed)
    g = -(-k // block_size)
    codes = rng.integers(0, 1 << bits, size=(n, k))
    scales = (rng.random((n, g)) * 0.05 + 0.01).astype(dtype)
    zp = {None: None,
          "uint8": rng.integers(0, 1 << bits, size=(n, g)).astype(np.uint8),
          "float": (rng.random((n, g)) * ((1 << bits) - 1)).astype(dtype)}[zp_kind]
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    a = rng.standard_normal((m, k)).astype(dtype)

    def dev(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x)).cuda()

    a_d, b_d, s_d, z_d, bias_d = dev(a), dev(pack_bitstream(codes, bits)), dev(scales), dev(zp), dev(bias)
    y_d = torch.empty((m, n), dtype=TORCH_DTYPE[dtype], device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    rc = fn(a_d.data_ptr(), b_d.data_ptr(), s_d.data_ptr(), None if z_d is None else z_d.data_ptr(),
            ZP_KIND[zp_kind], None if bias_d is None else bias_d.data_ptr(), y_d.data_ptr(), m, k, n, bits,
            block_size, DTYPE_CODE[dtype], stream)
    assert rc == 0, f"entry point returned {rc}"
    torch.cuda.synchronize()
    y = y_d.cpu().numpy().astype(np.float64)
    ref = reference(a, codes, scales, zp, bias, bits, block_size)
    err = np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    assert err < tol, f"relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 67])
def test_ragged_shapes_generic_path(entry_point, bits, m):
    run_case(entry_point, m=m, n=73, k=123, bits=bits, block_size=32, seed=bits + m)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 130])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_aligned_shapes_fast_path(entry_point, bits, m, dtype):
    run_case(entry_point, m=m, n=300, k=512, bits=bits, block_size=64, dtype=dtype, seed=bits * m)


@pytest.mark.parametrize("block_size", [16, 32, 48, 128, 123, 4096])
@pytest.mark.parametrize("m", [1, 67])
def test_block_sizes(entry_point, block_size, m):
    run_case(entry_point, m=m, n=73, k=256, bits=4, block_size=block_size)


@pytest.mark.parametrize("zp_kind", [None, "uint8", "float"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_zero_points_bias_dtypes(entry_point, zp_kind, with_bias, dtype):
    run_case(entry_point, m=4, n=96, k=384, bits=4, block_size=128, dtype=dtype, zp_kind=zp_kind,
             with_bias=with_bias)
    run_case(entry_point, m=33, n=96, k=384, bits=3, block_size=32, dtype=dtype, zp_kind=zp_kind,
             with_bias=with_bias)


def test_invalid_arguments_are_rejected(entry_point):
    assert entry_point(None, None, None, None, 0, None, None, 1, 8, 8, 4, 8, 1, None) == -1


def test_cuda_execution_provider_runs_the_op():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    n, k, bits, bs, m = 64, 256, 4, 32, 3
    codes = rng.integers(0, 16, size=(n, k))
    scales = (rng.random((n, k // bs)) * 0.05 + 0.01).astype(np.float16)
    a = rng.standard_normal((m, k)).astype(np.float16)
    node = helper.make_node(ops.OP_TYPE, ["A", "B", "S"], ["Y"], domain=ops.DOMAIN, K=k, N=n, bits=bits,
                            block_size=bs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT16, [m, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT16, [m, n])],
                              initializer=[numpy_helper.from_array(pack_bitstream(codes, bits), "B"),
                                           numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    so = ort.SessionOptions()
    ops.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CUDAExecutionProvider"])
    y = sess.run(None, {"A": a})[0].astype(np.float64)
    ref = reference(a, codes, scales, None, None, bits, bs)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-3
