"""How close a quantized model's outputs are to the float model's, streamed over a data source."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from onnxfgq.calibration.sources import CalibrationDataReader, iterate


def make_session(path: Path, *, custom_ops: bool = False):
    """A CPU session over the model file ``path``, its external data checked for containment first."""
    import onnxruntime as ort

    from onnxfgq.graph import external

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if custom_ops:
        from onnxfgq import ops

        ops.register(so)
    return external.session_from_path(path, so)


class OutputAgreement:
    """Streaming agreement metrics between reference and candidate outputs.

    Rows are the last axis of each output: cosine per row (mean and min), SQNR over everything,
    and top-1 agreement of the row argmax when rows have more than one element.

    Honest on degenerate outputs: a non-finite value (NaN/Inf, in either model) makes every metric
    NaN and is counted (``nonfinite_reference`` / ``nonfinite_candidate``), never read as agreement;
    a zero row agrees (cosine 1) only with a zero row; identical outputs have SQNR inf.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.cos_sum = 0.0
        self.cos_min = 1.0
        self.signal = 0.0
        self.noise = 0.0
        self.top1 = 0
        self.nonfinite_ref = 0
        self.nonfinite_out = 0
        self.unit_rows = True  # embeddings (unit-norm rows): argmax agreement means nothing there

    def update(self, ref: np.ndarray, out: np.ndarray) -> None:
        r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1] if ref.ndim else 1)
        o = np.asarray(out, np.float64).reshape(r.shape)
        self.nonfinite_ref += int(r.size - np.count_nonzero(np.isfinite(r)))
        self.nonfinite_out += int(o.size - np.count_nonzero(np.isfinite(o)))
        self.rows += r.shape[0]
        if self.nonfinite_ref or self.nonfinite_out:
            return  # the metrics are NaN from here on; only the counts still matter
        nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
        denom = nr * no
        both_zero = (nr == 0) & (no == 0)
        cos = np.where(denom > 0, (r * o).sum(1) / np.where(denom > 0, denom, 1.0), np.where(both_zero, 1.0, 0.0))
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.signal += float((r * r).sum())
        self.noise += float(((r - o) ** 2).sum())
        self.unit_rows &= bool(np.allclose(nr, 1.0, atol=1e-3))
        if r.shape[1] > 1:
            self.top1 += int((r.argmax(1) == o.argmax(1)).sum())

    @property
    def finite(self) -> bool:
        return not (self.nonfinite_ref or self.nonfinite_out)

    def _sqnr(self) -> float:
        if self.noise == 0:
            return float("inf")  # identical (finite) outputs
        if self.signal == 0:
            return float("-inf")
        return float(10 * np.log10(self.signal / self.noise))

    def metrics(self, with_top1: bool) -> dict[str, float]:
        nan = float("nan")
        ok = self.finite and self.rows > 0
        m = {
            "cosine_mean": self.cos_sum / self.rows if ok else nan,
            "cosine_min": self.cos_min if ok else nan,
            "sqnr_db": self._sqnr() if ok else nan,
        }
        if with_top1 and not self.unit_rows:
            m["top1_agreement"] = self.top1 / self.rows if ok else nan
        if not self.finite:
            m["nonfinite_reference"] = self.nonfinite_ref
            m["nonfinite_candidate"] = self.nonfinite_out
        return m


def _no_progress(items: Iterable, total: int, label: str) -> Iterable:
    del total, label
    return items


def compare(reference: Path, candidate: Path, reader: CalibrationDataReader, *,
            custom_ops: bool = False, progress: Callable = _no_progress,
            total: int = 0) -> tuple[dict[str, float], int]:
    """Metrics of ``candidate`` against ``reference`` (first output) and the number of samples.

    ``progress(items, total, label)`` wraps the batch loop (``total`` batches, 0 if unknown)."""
    ref_sess = make_session(reference)
    cand_sess = make_session(candidate, custom_ops=custom_ops)
    agreement = OutputAgreement()
    samples = 0
    last_dim = 1
    for feed in progress(iterate(reader), total, "evaluating"):
        ref = ref_sess.run(None, feed)[0]
        out = cand_sess.run(None, feed)[0]
        agreement.update(ref, out)
        samples += next(iter(feed.values())).shape[0] if feed else 1
        last_dim = ref.shape[-1] if ref.ndim else 1
    return agreement.metrics(with_top1=last_dim > 1), samples
