"""com.onnxfgq::MatMulBlockQuant in real onnxruntime (CPU) against a float64 numpy reference."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ort = pytest.importorskip("onnxruntime")

from onnxfgq import ops
from onnxfgq.quant.bitstream import pack_bitstream

NP_TO_ONNX = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


@pytest.fixture(scope="session")
def library():
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"cannot build the custom-op library: {', '.join(missing)} not on PATH")
    from onnxfgq import _build_ops

    # CPU only here: the CUDA variant is built by tools/build_custom_ops.py (CI) and is not
    # needed to exercise the CPU kernels; an existing build (with or without CUDA) is reused.
    if _build_ops.library_in_build_dir().is_file():
        return _build_ops.build(cuda=None)
    return _build_ops.build(cuda="OFF")


def make_weights(rng, n, k, bits, block_size, dtype, zp_kind):
    g = -(-k // block_size)
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.int64)
    scales = (rng.random((n, g)) * 0.05 + 0.01).astype(dtype)
    if zp_kind == "uint8":
        zp = rng.integers(0, 1 << bits, size=(n, g)).astype(np.uint8)
    elif zp_kind == "float":
        zp = (rng.random((n, g)) * ((1 << bits) - 1)).astype(dtype)
    else:
        zp = None
    return codes, scales, zp


def reference(a, codes, scales, zp, bias, bits, block_size):
    k = codes.shape[1]
    group = np.arange(k) // block_size
    zp64 = np.full(scales.shape, float(1 << (bits - 1))) if zp is None else zp.astype(np.float64)
    w = (codes - zp64[:, group]) * scales.astype(np.float64)[:, group]  # [N, K]
    y = a.astype(np.float64) @ w.T
    if bias is not None:
        y = y + bias.astype(np.float64)
    return y


def make_model(a_shape, n, k, bits, block_size, dtype, packed, scales, zp, bias, *, attrs=None):
    elem = NP_TO_ONNX[dtype]
    inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    inputs = ["A", "B", "scales", "", ""]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs[3] = "zp"
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        inputs[4] = "bias"
    while inputs[-1] == "":
        inputs.pop()
    node_attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    node_attrs.update(attrs or {})
    node = helper.make_node(ops.OP_TYPE, inputs, ["Y"], domain=ops.DOMAIN, **node_attrs)
    leading = list(a_shape[:-1])
    graph = helper.make_graph(
        [node], "mbq",
        [helper.make_tensor_value_info("A", elem, list(a_shape))],
        [helper.make_tensor_value_info("Y", elem, leading + [n])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ops.DOMAIN, ops.OPSET_VERSION)])


def run(model, a):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    ops.register(so)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"A": a})[0]


def check(library, *, m_shape, n, k, bits, block_size, dtype=np.float32, zp_kind="uint8", with_bias=True,
          seed=0):
    rng = np.random.default_rng(seed)
    codes, scales, zp = make_weights(rng, n, k, bits, block_size, dtype, zp_kind)
    bias = (rng.standard_normal(n)).astype(dtype) if with_bias else None
    a = rng.standard_normal(tuple(m_shape) + (k,)).astype(dtype)
    model = make_model(a.shape, n, k, bits, block_size, dtype, pack_bitstream(codes, bits), scales, zp, bias)
    y = run(model, a)
    assert y.dtype == dtype and y.shape == tuple(m_shape) + (n,)
    ref = reference(a.reshape(-1, k), codes, scales, zp, bias, bits, block_size).reshape(y.shape)
    err = np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12)
    tol = 1e-5 if dtype == np.float32 else 2e-3
    assert err < tol, f"relative error {err:.3g} >= {tol}"


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("m", [1, 5, 67])
def test_all_bit_widths_ragged_shapes(library, bits, m):
    check(library, m_shape=(m,), n=73, k=123, bits=bits, block_size=32, seed=bits * 10 + m)


@pytest.mark.parametrize("block_size", [16, 32, 48, 128, 123, 500, 7, 20])
@pytest.mark.parametrize("m", [1, 5, 67])
def test_block_sizes_including_non_powers_of_two_and_per_channel(library, block_size, m):
    check(library, m_shape=(m,), n=73, k=123, bits=4, block_size=block_size, seed=block_size + m)


@pytest.mark.parametrize("zp_kind", ["uint8", "float", None])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_zero_point_kinds_and_bias(library, zp_kind, with_bias, bits):
    check(library, m_shape=(5,), n=73, k=123, bits=bits, block_size=48, zp_kind=zp_kind, with_bias=with_bias)


@pytest.mark.parametrize("m", [1, 67])
@pytest.mark.parametrize("zp_kind", ["uint8", "float", None])
@pytest.mark.parametrize("bits", [3, 4])
def test_float16(library, m, zp_kind, bits):
    check(library, m_shape=(m,), n=73, k=123, bits=bits, block_size=32, dtype=np.float16, zp_kind=zp_kind)


@pytest.mark.parametrize("m_shape", [(2, 3), (3, 22), (1, 1)])
def test_three_dimensional_a(library, m_shape):
    check(library, m_shape=m_shape, n=40, k=96, bits=4, block_size=32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("block_size", [32, 48, 20])
@pytest.mark.parametrize("m", [1, 5, 67])
def test_portable_scalar_variant(library, monkeypatch, bits, block_size, m):
    monkeypatch.setenv("ONNXFGQ_CPU_KERNEL", "scalar")
    check(library, m_shape=(m,), n=73, k=123, bits=bits, block_size=block_size, zp_kind="float", seed=m + bits)


def test_larger_layer_uses_many_tasks(library):
    check(library, m_shape=(3,), n=517, k=1000, bits=4, block_size=128, seed=7)
    check(library, m_shape=(33,), n=517, k=1000, bits=5, block_size=64, seed=8)


def make_small_model(**overrides):
    rng = np.random.default_rng(0)
    n, k, bits, bs = 8, 40, 4, 16
    codes, scales, zp = make_weights(rng, n, k, bits, bs, np.float32, "uint8")
    args = {"a_shape": (2, k), "n": n, "k": k, "bits": bits, "block_size": bs, "dtype": np.float32,
            "packed": pack_bitstream(codes, bits), "scales": scales, "zp": zp, "bias": None}
    args.update(overrides)
    return make_model(**args)


def test_wrong_scales_shape_is_a_clean_error(library):
    model = make_small_model(scales=np.ones((8, 2), dtype=np.float32))  # needs [8, 3]
    with pytest.raises(Exception, match=r"scales.*\[N, ceil\(K/block_size\)\] = \[8, 3\], got \[8, 2\]"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_wrong_packed_width_is_a_clean_error(library):
    model = make_small_model(packed=np.zeros((8, 19), dtype=np.uint8))
    with pytest.raises(Exception, match=r"'B'.*\[8, 20\], got \[8, 19\]"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_wrong_a_width_is_a_clean_error(library):
    model = make_small_model(a_shape=(2, 39))
    with pytest.raises(Exception, match=r"'A'.*K = 40"):
        run(model, np.zeros((2, 39), dtype=np.float32))


def test_wrong_zero_point_dtype_is_a_clean_error(library):
    model = make_small_model(zp=np.zeros((8, 3), dtype=np.int32))
    with pytest.raises(Exception, match=r"zero_points.*uint8 or float"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_wrong_scales_dtype_is_a_clean_error(library):
    model = make_small_model(scales=np.ones((8, 3), dtype=np.float16))  # A is float
    with pytest.raises(Exception, match=r"'scales' \(index 2\) must be float, got float16"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_wrong_packed_dtype_is_a_clean_error(library):
    model = make_small_model(packed=np.zeros((8, 20), dtype=np.int8))
    with pytest.raises(Exception, match=r"'B' \(index 1\) must be uint8, got int8"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_bad_bits_attribute_is_a_clean_error(library):
    model = make_small_model(attrs={"bits": 9})
    with pytest.raises(Exception, match=r"bits must be in 2..8"):
        run(model, np.zeros((2, 40), dtype=np.float32))


def test_model_passes_onnx_checker(library):
    model = make_small_model()
    onnx.checker.check_model(model, full_check=True)


def test_debian_index_parsing_and_cached_headers(library):
    from onnxfgq import _build_ops

    index = ("Package: libfoo\nVersion: 1\n\nPackage: libonnxruntime-dev\nVersion: 1.21.0+dfsg-1\n"
             "Filename: pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb\nSHA256: ab\n")
    fields = _build_ops._find_package(index, "libonnxruntime-dev")
    assert fields["Filename"].endswith("_amd64.deb") and fields["SHA256"] == "ab"
    with pytest.raises(_build_ops.BuildError, match="not found"):
        _build_ops._find_package(index, "libbar")
    # The library fixture fetched the headers: a second call is a cache hit (no network).
    assert (_build_ops.fetch_ort_headers() / "onnxruntime_c_api.h").is_file()


def test_output_shape_helper():
    assert ops.output_shape([2, "seq", 123], 73) == [2, "seq", 73]
    with pytest.raises(ValueError):
        ops.output_shape([], 4)


def test_library_path_and_errors(library, monkeypatch, tmp_path):
    assert ops.library_path() == library
    monkeypatch.setenv(ops.ENV_VAR, str(tmp_path / "missing.so"))
    with pytest.raises(ops.OpsLibraryError, match="build_custom_ops"):
        ops.library_path()
    broken = tmp_path / "broken.so"
    broken.write_bytes(b"not a library")
    monkeypatch.setenv(ops.ENV_VAR, str(broken))
    with pytest.raises(ops.OpsLibraryError, match=r"onnxruntime .* could not load .*broken.so"):
        ops.register(ort.SessionOptions())
