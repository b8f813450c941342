"""Streaming observers against straightforward numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from onnxfgq.calibration.observers import (
    OBSERVERS,
    EntropyObserver,
    Histogram,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    _kl_threshold,
    expected_mse,
    make_observer,
)


def _batches(seed=0, n=12, shape=(4, 3, 37), scale_growth=True):
    rng = np.random.default_rng(seed)
    # Growing scales force the histogram to widen (merge bins) several times.
    return [rng.standard_normal(shape).astype(np.float32) * ((i + 1) if scale_growth else 1) + 0.3 * i
            for i in range(n)]


@pytest.mark.parametrize("axis", [None, 1])
def test_minmax_matches_numpy(axis):
    batches = _batches()
    obs = MinMaxObserver(axis)
    for b in batches:
        obs.update(b)
    full = np.concatenate(batches, axis=0)
    lo, hi = obs.range()
    red = None if axis is None else tuple(i for i in range(full.ndim) if i != axis)
    np.testing.assert_allclose(lo, full.min(axis=red))
    np.testing.assert_allclose(hi, full.max(axis=red))


def test_histogram_widening_keeps_every_count_and_the_quantiles():
    batches = _batches(n=20)
    h = Histogram(512)
    for b in batches:
        h.add(b.ravel())
    full = np.concatenate([b.ravel() for b in batches]).astype(np.float64)
    assert h.counts.sum() == full.size
    assert h.start <= full.min() and full.max() < h.start + h.bins * h.width
    # Each bin holds exactly the values falling in it (widening merges whole bins, never splits them).
    ref, _ = np.histogram(full, bins=h.edges)
    np.testing.assert_array_equal(h.counts, ref)
    for q in (0.001, 0.5, 0.999):
        assert abs(h.quantile(q) - np.quantile(full, q)) <= h.width


@pytest.mark.parametrize("axis", [None, 1])
def test_percentile_close_to_numpy(axis):
    batches = _batches(seed=1)
    obs = PercentileObserver(axis, percentile=99.0, bins=4096)
    for b in batches:
        obs.update(b)
    full = np.concatenate(batches, axis=0)
    moved = full.reshape(-1) if axis is None else np.moveaxis(full, axis, 0).reshape(full.shape[axis], -1)
    lo, hi = obs.range()
    ref_lo = np.percentile(moved, 1.0, axis=-1)
    ref_hi = np.percentile(moved, 99.0, axis=-1)
    tol = max(h.width for h in obs.hists)  # within one (possibly widened) bin
    np.testing.assert_allclose(lo, ref_lo, atol=tol)
    np.testing.assert_allclose(hi, ref_hi, atol=tol)


def _kl_threshold_reference(counts, levels):
    """TensorRT's entropy calibration written out plainly (one threshold at a time, bin by bin)."""
    n = len(counts)
    best, best_i = np.inf, n
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(sum(counts[i:]))
        q = [0.0] * i
        for chunk in np.array_split(np.arange(i), levels):
            occupied = [j for j in chunk if counts[j] > 0]
            for j in occupied:
                q[j] = sum(float(counts[k]) for k in chunk) / len(occupied)
        ps, qs = sum(p), sum(q)
        kl, valid = 0.0, True
        for pj, qj in zip(p, q):
            if pj > 0:
                if qj == 0:
                    valid = False
                    break
                kl += pj / ps * np.log((pj / ps) / (qj / qs))
        if valid and kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_threshold_matches_the_plain_reference():
    rng = np.random.default_rng(3)
    counts, _ = np.histogram(np.abs(rng.standard_normal(20000)) ** 1.5, bins=300)
    assert _kl_threshold(counts.astype(np.float64), 32) == _kl_threshold_reference(counts, 32)


def test_entropy_clips_a_long_tail_but_keeps_the_bulk():
    rng = np.random.default_rng(4)
    x = rng.standard_normal(200000)
    x[:20] = 60.0  # rare outliers
    obs = EntropyObserver()
    obs.update(x)
    lo, hi = obs.range()
    assert 2.5 < hi < 30 and -30 < lo < -2.5


def _quant_mse(x, lo, hi, bits=8):
    """Brute force: quantize every sample on [lo, hi] and measure."""
    step = (hi - lo) / (2**bits - 1)
    q = np.clip(np.round((x - lo) / step), 0, 2**bits - 1) * step + lo
    return float(np.sum((x - q) ** 2))


def test_mse_estimate_tracks_brute_force_and_the_choice_beats_minmax():
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(100000), rng.standard_normal(30) * 40])
    obs = MSEObserver()
    obs.update(x)
    lo, hi = (float(v) for v in obs.range())
    h = obs.hists[0]
    for a, b in ((x.min(), x.max()), (lo, hi)):
        est, real = expected_mse(h, a, b, 8), _quant_mse(x, a, b)
        assert abs(est - real) / real < 0.25
    chosen = _quant_mse(x, lo, hi)
    assert chosen < _quant_mse(x, x.min(), x.max())
    grid = [_quant_mse(x, x.min() * a, x.max() * a) for a in np.linspace(1.0, 0.02, 50)]
    assert chosen <= 1.1 * min(grid)


@pytest.mark.parametrize("kind", sorted(OBSERVERS))
@pytest.mark.parametrize("axis", [None, 0])
def test_state_does_not_grow_with_samples(kind, axis):
    obs = make_observer(kind, axis)
    batches = _batches(n=100, shape=(3, 8, 64))
    for b in batches[:10]:
        obs.update(b)
    size = obs.state_nbytes()
    for b in batches[10:]:
        obs.update(b)
    assert obs.state_nbytes() == size
    lo, hi = obs.range()
    assert np.all(lo <= hi)
    assert np.shape(lo) == (() if axis is None else (3,))


def test_non_finite_values_are_ignored_and_unknown_kinds_rejected():
    obs = PercentileObserver(percentile=100.0)
    obs.update(np.array([1.0, -2.0, np.inf, np.nan, -np.inf]))
    assert tuple(float(v) for v in obs.range()) == (-2.0, 1.0)
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("nope")
    with pytest.raises(ValueError, match="no data"):
        MinMaxObserver().range()
