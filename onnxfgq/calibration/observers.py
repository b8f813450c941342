"""Streaming range observers: ``update(x)`` batch by batch, then ``range()``.

Every observer holds a fixed-size state (a min/max pair or a fixed number of histogram bins per
channel), so memory never depends on how many samples go through. ``axis=None`` observes the whole
tensor; ``axis=k`` keeps one range per index of axis ``k`` (per-channel).

- MinMax: the exact extremes.
- Percentile: the ``percentile`` and ``100 - percentile`` quantiles of a histogram.
- Entropy: the clipping threshold that minimises the KL divergence between the observed distribution
  and its 8-bit quantized version (TensorRT's calibration).
- MSE: the clipping range that minimises the expected squared error of ``bits``-bit rounding plus
  clipping, estimated from the histogram.

The histogram keeps its bin count fixed: when a batch falls outside the covered span, the bin width
doubles (neighbouring bins merge exactly) until it fits, so no earlier sample is ever needed again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_BINS = 2048


def _channels_first(x: np.ndarray, axis: int | None) -> np.ndarray:
    """``x`` as ``[C, -1]`` float64 (``C = 1`` for per-tensor)."""
    x = np.asarray(x)
    if axis is None:
        return x.reshape(1, -1).astype(np.float64)
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).astype(np.float64)


def _finite(row: np.ndarray) -> np.ndarray:
    return row if np.isfinite(row).all() else row[np.isfinite(row)]


class Observer:
    """Base: per-channel ranges over a stream of batches."""

    def __init__(self, axis: int | None = None):
        self.axis = axis
        self.batches = 0

    def update(self, x: np.ndarray) -> None:
        rows = _channels_first(x, self.axis)
        self._update(rows)
        self.batches += 1

    __call__ = update  # an observer is a Collector sink

    def range(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): scalars (0-d arrays) for per-tensor, ``[C]`` arrays for per-channel."""
        if not self.batches:
            raise ValueError(f"{type(self).__name__}: no data observed")
        lo, hi = self._range()
        if self.axis is None:
            return np.asarray(lo[0]), np.asarray(hi[0])
        return lo, hi

    def state_nbytes(self) -> int:
        """Bytes of observer state (constant in the number of samples, by design)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray)) + sum(
            v.nbytes for h in getattr(self, "hists", []) for v in vars(h).values() if isinstance(v, np.ndarray))

    def _update(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class MinMaxObserver(Observer):
    def __init__(self, axis: int | None = None):
        super().__init__(axis)
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def _update(self, rows: np.ndarray) -> None:
        lo = np.array([_finite(r).min(initial=np.inf) for r in rows])
        hi = np.array([_finite(r).max(initial=-np.inf) for r in rows])
        self.lo = lo if self.lo is None else np.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else np.maximum(self.hi, hi)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        return self.lo.copy(), self.hi.copy()


class Histogram:
    """A fixed number of equal bins over ``[start, start + bins * width)`` that widens by merging."""

    def __init__(self, bins: int = DEFAULT_BINS):
        self.counts = np.zeros(bins, dtype=np.float64)
        self.start = 0.0
        self.width = 0.0  # 0: nothing observed yet
        self.lo = np.inf  # exact extremes, kept alongside
        self.hi = -np.inf

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def edges(self) -> np.ndarray:
        return self.start + self.width * np.arange(self.bins + 1)

    def add(self, values: np.ndarray) -> None:
        values = _finite(values)
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        if self.width == 0.0:
            span = hi - lo
            self.width = span / self.bins if span > 0 else max(abs(lo), 1e-12) / self.bins
            self.start = lo
        self._cover(lo, hi)
        idx = np.floor((values - self.start) / self.width).astype(np.int64)
        np.clip(idx, 0, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _cover(self, lo: float, hi: float) -> None:
        """Widen (merging 2**k neighbouring bins, shifting by whole old bins) until [lo, hi] fits."""
        end = self.start + self.bins * self.width
        if lo >= self.start and hi < end:
            return
        shift = int(np.ceil((self.start - lo) / self.width)) if lo < self.start else 0
        need = max(hi, end) - (self.start - shift * self.width)
        k = 0
        while self.bins * self.width * (1 << k) <= need:
            k += 1
        old = np.nonzero(self.counts)[0]
        merged = np.zeros_like(self.counts)
        np.add.at(merged, (old + shift) >> k, self.counts[old])
        self.counts = merged
        self.start -= shift * self.width
        self.width *= 1 << k

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the observed mass lies (linear within a bin)."""
        cdf = np.cumsum(self.counts)
        target = q * cdf[-1]
        i = int(np.searchsorted(cdf, target, side="left"))
        i = min(i, self.bins - 1)
        before = cdf[i - 1] if i else 0.0
        frac = (target - before) / self.counts[i] if self.counts[i] > 0 else 0.0
        return float(np.clip(self.start + (i + frac) * self.width, self.lo, self.hi))

    def centers(self) -> np.ndarray:
        return self.start + self.width * (np.arange(self.bins) + 0.5)


class HistogramObserver(Observer):
    """Keeps one :class:`Histogram` per channel; subclasses choose the range from it."""

    def __init__(self, axis: int | None = None, bins: int = DEFAULT_BINS):
        super().__init__(axis)
        self.bins = bins
        self.hists: list[Histogram] = []

    def _update(self, rows: np.ndarray) -> None:
        if not self.hists:
            self.hists = [Histogram(self.bins) for _ in range(len(rows))]
        if len(rows) != len(self.hists):
            raise ValueError(f"channel count changed from {len(self.hists)} to {len(rows)}")
        for h, r in zip(self.hists, rows):
            h.add(r)

    def _range(self) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self._choose(h) if h.width > 0 else (0.0, 0.0) for h in self.hists]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def _choose(self, h: Histogram) -> tuple[float, float]:
        raise NotImplementedError


class PercentileObserver(HistogramObserver):
    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = DEFAULT_BINS):
        super().__init__(axis, bins)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _choose(self, h: Histogram) -> tuple[float, float]:
        q = self.percentile / 100.0
        return h.quantile(1.0 - q), h.quantile(q)


def _magnitudes(h: Histogram) -> tuple[np.ndarray, float]:
    """|x| histogram (counts over ``h.bins`` bins of ``[0, absmax]``) rebuilt from the signed one."""
    absmax = max(abs(h.lo), abs(h.hi))
    counts, _ = np.histogram(np.abs(h.centers()), bins=h.bins, range=(0.0, absmax or 1.0), weights=h.counts)
    return counts, absmax


def _kl_threshold(counts: np.ndarray, levels: int = 128) -> int:
    """Bin count ``i`` (threshold = i bins) minimising KL(P_i || Q_i), TensorRT's entropy calibration."""
    n = len(counts)
    best, best_i = np.inf, n
    total = counts.sum()
    if total == 0:
        return n
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        p = counts[:i].astype(np.float64).copy()
        p[i - 1] += counts[i:].sum()  # clipped outliers pile up on the edge
        nonzero = (counts[:i] > 0).astype(np.float64)
        starts = np.array([c[0] for c in np.array_split(np.arange(i), levels) if len(c)])
        mass = np.add.reduceat(counts[:i].astype(np.float64), starts)
        occupied = np.add.reduceat(nonzero, starts)
        per_bin = np.where(occupied > 0, mass / np.maximum(occupied, 1), 0.0)
        q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
        pm, qm = p / p.sum(), q / max(q.sum(), 1e-300)
        mask = pm > 0
        if (qm[mask] == 0).any():
            continue
        kl = float(np.sum(pm[mask] * np.log(pm[mask] / qm[mask])))
        if kl < best:
            best, best_i = kl, i
    return best_i


class EntropyObserver(HistogramObserver):
    """Symmetric KL-optimal threshold ``T`` on |x|, intersected with the observed [min, max]."""

    def __init__(self, axis: int | None = None, bins: int = DEFAULT_BINS, levels: int = 128):
        super().__init__(axis, bins)
        self.levels = levels

    def _choose(self, h: Histogram) -> tuple[float, float]:
        counts, absmax = _magnitudes(h)
        t = _kl_threshold(counts, self.levels) / len(counts) * absmax
        return max(h.lo, -t), min(h.hi, t)


def expected_mse(h: Histogram, lo: float, hi: float, bits: int) -> float:
    """Expected squared error of quantizing the histogram's mass to ``bits`` bits on [lo, hi]:
    uniform rounding noise inside, distance to the nearest end outside (bin centres stand for bins)."""
    x = h.centers()
    step = (hi - lo) / ((1 << bits) - 1)
    inside = (x >= lo) & (x <= hi)
    err = np.where(inside, step * step / 12.0, np.where(x < lo, lo - x, x - hi) ** 2)
    return float(np.sum(h.counts * err))


def quantization_snr_db(h: Histogram, lo: float, hi: float, bits: int = 8) -> float:
    """Estimated signal-to-noise ratio (dB) of quantizing the histogram's mass on [lo, hi]."""
    signal = float(np.sum(h.counts * h.centers() ** 2))
    noise = expected_mse(h, lo, hi, bits) if hi > lo else signal
    if noise <= 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-300) / noise)


class MSEObserver(HistogramObserver):
    """The range, shrunk from [min, max] towards 0 (or towards the mass's median on one side), that
    minimises :func:`expected_mse` for ``bits``-bit codes."""

    def __init__(self, axis: int | None = None, bits: int = 8, bins: int = DEFAULT_BINS, steps: int = 100):
        super().__init__(axis, bins)
        self.quant_bits, self.steps = bits, steps

    def _choose(self, h: Histogram) -> tuple[float, float]:
        lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
        best, best_err = (lo, hi), expected_mse(h, lo, hi, self.quant_bits)
        # Shrink each end separately: one-sided outliers (after GELU, say) must not force the other end in.
        for a in np.linspace(1.0, 0.01, self.steps)[1:]:
            for cand in ((lo * a, hi * a), (lo, hi * a), (lo * a, hi)):
                if cand[1] - cand[0] <= 0:
                    continue
                err = expected_mse(h, cand[0], cand[1], self.quant_bits)
                if err < best_err:
                    best, best_err = cand, err
        return float(best[0]), float(best[1])


OBSERVERS: dict[str, Callable[..., Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(kind: str, axis: int | None = None, **options) -> Observer:
    try:
        factory = OBSERVERS[kind]
    except KeyError:
        raise ValueError(f"unknown observer {kind!r}; choose one of {sorted(OBSERVERS)}") from None
    return factory(axis, **options)


class MeanObserver:
    """Running mean per channel (``axis``; negative counts from the end): a sum and a count per channel,
    the statistic bias correction needs. A Collector sink like the range observers."""

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.count = 0

    def __call__(self, x: np.ndarray) -> None:
        rows = _channels_first(x, self.axis % np.ndim(x))
        finite = np.where(np.isfinite(rows), rows, 0.0)
        self.sum = finite.sum(axis=1) if self.sum is None else self.sum + finite.sum(axis=1)
        self.count += rows.shape[1]

    def mean(self) -> np.ndarray:
        if self.sum is None or not self.count:
            raise ValueError("MeanObserver: no data observed")
        return self.sum / self.count
