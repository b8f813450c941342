"""The pieces that bound memory and time on models larger than memory (issue 11), each against an
independent reference: GPTQ's inverse-Hessian factor, the streamed Gram matrix, column slices solved
on threads, and quantized tensors spooled to disk as they are made."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxfgq import QuantizeConfig, WeightConfig
from onnxfgq.algorithms.base import QuantSpec
from onnxfgq.algorithms.gptq import GPTQ, prepare
from onnxfgq.algorithms.stats import ActivationStats
from onnxfgq.api import _quantize_model, quantize_file
from onnxfgq.engine.runner import ColumnChunks
from onnxfgq.errors import ValidationError
from onnxfgq.graph import io
from onnxfgq.graph.spool import Spool
from tests.helpers import mlp, run


def _hessian(k: int, rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) * rng.uniform(0.05, 4.0, k)  # channels of very different scale
    return x.T @ x / rows


@pytest.mark.parametrize("k", [73, 300])
def test_inverse_factor_is_the_textbook_cholesky_of_the_damped_inverse(k):
    h = _hessian(k, k + 40)
    h[7, :] = h[:, 7] = 0.0  # a dead input channel
    dead, perm, u = prepare(h, damp=0.01)
    hp = h[np.ix_(perm, perm)].copy()
    rows = np.flatnonzero(dead[perm])
    hp[rows, rows] = 1.0
    hp.flat[::k + 1] += 0.01 * (np.diag(h)[~dead].sum() + dead.sum()) / k
    reference = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper, U^T U = H'^-1
    assert u.dtype == np.float32
    assert np.allclose(np.tril(u, -1), 0.0)
    assert np.abs(u - reference).max() <= 1e-5 * np.abs(reference).max()


def test_inverse_factor_from_the_gram_matrix_with_divisors_equals_the_normalised_hessian():
    gram = _hessian(96, 200, seed=1) * 200
    rows, scale = 200.0, float(np.mean(np.diag(gram) / 200))
    _, perm_a, u_a = prepare(gram, damp=0.01, divisors=(rows, scale))
    _, perm_b, u_b = prepare(gram / rows / scale, damp=0.01)
    assert np.array_equal(perm_a, perm_b)
    assert np.array_equal(u_a, u_b)  # the same float64 numbers: dividing after permuting is exact


def test_streamed_gram_matrix_is_exact_and_symmetric():
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((150, 1100)).astype(np.float32) for _ in range(3)]
    batches[1] *= 1e17  # x^T x overflows float32 here: that batch is scaled
    weights = rng.uniform(0, 2, 150)
    st = ActivationStats()
    st.update(batches[0])
    st.update(batches[1])
    st.update(batches[2], weights)
    ref = sum(b.astype(np.float64).T @ b for b in batches[:2])
    ref += (batches[2].astype(np.float64) * weights[:, None]).T @ batches[2]
    assert np.isfinite(st.gram).all()
    assert np.array_equal(st.gram, st.gram.T)
    assert np.abs(st.gram - ref).max() <= 1e-6 * np.abs(ref).max()
    assert st.rows == pytest.approx(300 + weights.sum())
    st.update(batches[0])  # more rows after a read: still the full sum
    assert np.abs(st.gram - ref - batches[0].astype(np.float64).T @ batches[0]).max() <= 1e-6 * np.abs(ref).max()


def _stats(k: int, rows: int, seed: int = 3) -> ActivationStats:
    st = ActivationStats()
    st.update(np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32))
    return st


def test_column_slices_on_threads_give_the_same_bytes_as_one_thread():
    st = _stats(160, 400)
    w = np.random.default_rng(4).standard_normal((160, 200)).astype(np.float32)
    spec = QuantSpec(4, (32, 1), False)
    one = ColumnChunks(GPTQ(st), columns=48, workers=1).solve(w, spec)
    many = ColumnChunks(GPTQ(st), columns=48, workers=3).solve(w, spec)
    whole = GPTQ(st).solve(w, spec)
    assert one.codes.dtype == np.uint8
    assert np.array_equal(one.codes, many.codes)
    assert np.array_equal(one.qparams.scale, many.qparams.scale)
    # GPTQ acts on each output column separately: slices agree with the whole solve but for rounding
    assert np.mean(one.codes == whole.codes) > 0.999
    assert np.allclose(one.qparams.scale, whole.qparams.scale, rtol=1e-4)


def _external_model(folder: Path) -> Path:
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(mlp(k=256, hidden=192, n=64), path, save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    return path


def test_spooled_output_is_the_in_memory_output(tmp_path):
    """With external data the quantized tensors go to disk as they are made (bounded memory), and the
    written model is the one the in-memory path writes, byte for byte in its data file."""
    src = _external_model(tmp_path / "in")
    config = QuantizeConfig(weights=WeightConfig(block_size=32))
    with Spool.beside(tmp_path / "probe.onnx") as spool:
        result = _quantize_model(io.load(src), config, lambda items, total, label: items, spool=spool)
        quantized = [v.const_value for v in result.model.graph.initializers.values()
                     if v.name.endswith("_q")]
        assert quantized and all(isinstance(t, ir.ExternalTensor) for t in quantized)
        assert all(Path(t.base_dir) == spool.folder for t in quantized)
    assert not spool.folder.exists()

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    quantize_file(src, tmp_path / "a" / "q.onnx", config, external=True)  # spooled
    plain = _quantize_model(io.load(src), config, lambda items, total, label: items)
    io.save(plain.model, tmp_path / "b" / "q.onnx", external=True)
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "q.onnx.data").read_bytes() == (b / "q.onnx.data").read_bytes()
    feed = {"x": np.random.default_rng(5).standard_normal((3, 256)).astype(np.float32)}
    assert np.array_equal(run(a / "q.onnx", feed)[0], run(b / "q.onnx", feed)[0])
    assert sorted(p.name for p in a.iterdir()) == ["q.onnx", "q.onnx.data"]  # no spool left beside it


def test_spool_is_removed_when_the_run_fails(tmp_path, monkeypatch):
    src = _external_model(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()

    def refuse(path, **kwargs):
        raise ValidationError("refused by the test")

    monkeypatch.setattr(io, "check", refuse)
    with pytest.raises(ValidationError):
        quantize_file(src, out / "q.onnx", QuantizeConfig(weights=WeightConfig(block_size=32)))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("spec", [QuantSpec(4, (128, 1), False), QuantSpec(4, (64, 1), True), QuantSpec(3, (300, 1), False)])
def test_rtn_in_column_slices_is_rtn(spec):
    """RTN's file-to-file path quantizes wide weights a slice of columns at a time (bounded temporaries):
    the same codes and qparams as the whole weight at once, and the same SQNR."""
    from onnxfgq.algorithms.rtn import RTN, solve_with_sqnr
    from onnxfgq.quant import sqnr_db

    w = np.random.default_rng(6).standard_normal((300, 2500)).astype(np.float32)
    whole = RTN().solve(w, spec)
    sliced, sqnr = solve_with_sqnr(w, spec, columns=700)
    assert np.array_equal(whole.codes, sliced.codes)
    assert np.array_equal(whole.qparams.scale, sliced.qparams.scale)
    assert np.array_equal(whole.qparams.zero_point, sliced.qparams.zero_point)
    assert sqnr == pytest.approx(sqnr_db(w, whole.dequantize()), abs=1e-4)
    w[5, 2000] = np.nan
    assert np.isnan(solve_with_sqnr(w, spec, columns=700)[1])  # NaN is reported as NaN


def test_in_place_factorisation_retries_from_the_fallback():
    """The first attempt overwrites the Hessian; a retry with more damping reads it again."""
    h = _hessian(40, 60)
    h -= 0.3 * np.mean(np.diag(h)) * np.eye(40)  # indefinite: damping 0.01 and 0.1 fail, 1.0 succeeds
    copy = h.copy()
    expected = prepare(h.copy(), damp=0.01)
    got = prepare(h, damp=0.01, overwrite=True, fallback=lambda: copy)
    assert np.array_equal(expected[2], got[2])


def test_released_statistics_answer_from_their_file(tmp_path):
    st = _stats(300, 500)
    w = np.random.default_rng(8).standard_normal((300, 20)).astype(np.float32)
    wq = w + np.random.default_rng(9).standard_normal(w.shape).astype(np.float32) * 0.01
    before = (st.output_error(w, wq), st.diagonal().copy(), st.normalized32().copy())
    st.cache.clear()
    gram = st.release_gram()
    gram[:] = 0.0  # the caller owns it now (GPTQ factorises it in place)
    assert st.output_error(w, wq) == pytest.approx(before[0], rel=1e-12)
    assert np.array_equal(st.diagonal(), before[1])
    assert np.array_equal(st.normalized32(), before[2])
    st.discard()


def test_a_large_output_is_checked_in_bounded_memory(tmp_path, monkeypatch):
    """Above the limit the output is not loaded in onnxruntime (that load holds all its weights) where
    onnx.checker vouches for it, and the report says what was checked."""
    src = _external_model(tmp_path / "in")
    (tmp_path / "out").mkdir()
    loads = []
    real = io._runtime_error
    monkeypatch.setattr(io, "_runtime_error", lambda *a, **k: loads.append(a) or real(*a, **k))
    monkeypatch.setattr(io, "ORT_PRECHECK_BYTES", 1000)
    report = quantize_file(src, tmp_path / "out" / "q.onnx", QuantizeConfig(weights=WeightConfig(block_size=32)))
    assert loads == []
    assert any("validated by onnx.checker by path" in n and "not loaded in onnxruntime" in n for n in report.notes)
    feed = {"x": np.random.default_rng(10).standard_normal((2, 256)).astype(np.float32)}
    assert run(tmp_path / "out" / "q.onnx", feed)[0].shape == (2, 64)  # and it does load
