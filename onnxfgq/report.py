"""What a quantization run did and how close the result is to floating point."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    op_type: str
    shape: tuple[int, ...]
    status: str  # "quantized" | "shared" | "skipped"
    reason: str = ""
    bits: int = 0
    block: str = ""
    format: str = ""
    algorithm: str = ""
    sqnr_db: float | None = None
    bytes_before: int = 0
    bytes_after: int = 0
    output_sqnr_db: float | None = None  # the layer's output vs float on the calibration data
    weight_bits: int = 0  # stored bits of codes + scales + zero points (0: not counted)
    detail: str = ""  # what the algorithm did (e.g. the AWQ scale and where it went)


@dataclass
class Accuracy:
    data: str
    samples: int
    metrics: dict[str, float]


@dataclass
class Report:
    input_path: str = ""
    output_path: str = ""
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    size_before: int = 0
    size_after: int = 0
    seconds: float = 0.0
    accuracy: Accuracy | None = None

    def bits_per_weight(self) -> float | None:
        """Average stored bits per quantized MatMul weight, scales and zero points included."""
        counted = [layer for layer in self.layers if layer.weight_bits]
        n = sum(math.prod(layer.shape) for layer in counted)
        return sum(layer.weight_bits for layer in counted) / n if n else None

    @property
    def quantized(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.status != "skipped"]

    def to_json(self) -> str:
        """The report as JSON. Non-finite numbers (a NaN cosine, an inf SQNR) are written as the
        strings "nan", "inf" and "-inf", so the file stays valid JSON (bare NaN is not)."""
        def clean(o):
            if isinstance(o, float) and not math.isfinite(o):
                return str(o)
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            return o

        data = asdict(self)
        data["layers_quantized"] = len(self.quantized)
        data["bits_per_weight"] = self.bits_per_weight()
        return json.dumps(clean(data), indent=2)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def size_change(before: int, after: int) -> str:
    """"3.71x smaller", or "12% larger" when the output grew (small models: scales, new nodes)."""
    if after <= 0 or before <= 0:
        return "size not measured"
    if after <= before:
        return f"{before / after:.2f}x smaller"
    return f"{100 * (after - before) / before:.0f}% larger"


def format_metrics(metrics: dict[str, float]) -> str:
    """``cosine_mean 0.9912, sqnr_db 21.3000``; counts as integers, NaN as ``nan``."""
    return ", ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}" for k, v in metrics.items())


def nonfinite_note(metrics: dict[str, float]) -> str | None:
    """A warning when the outputs held NaN/Inf (then every agreement metric is nan)."""
    ref, cand = metrics.get("nonfinite_reference", 0), metrics.get("nonfinite_candidate", 0)
    if not (ref or cand):
        return None
    return (f"the outputs hold non-finite values ({cand} in the quantized model, {ref} in the reference): "
            "agreement cannot be measured, so the metrics are nan")


def render(report: Report, console) -> None:
    """Print the report with rich: per-layer table, then the summary."""
    from rich.table import Table

    table = Table(title="layers", show_lines=False)
    calibrated = any(layer.output_sqnr_db is not None for layer in report.layers)
    cols = ("layer", "op", "shape", "status", "algo", "bits", "block", "SQNR dB")
    for col in cols + (("out SQNR dB",) if calibrated else ()) + ("note",):
        table.add_column(col, overflow="fold")
    for layer in report.layers:
        sq = "" if layer.sqnr_db is None else f"{layer.sqnr_db:.1f}"
        out = () if not calibrated else ("" if layer.output_sqnr_db is None else f"{layer.output_sqnr_db:.1f}",)
        table.add_row(layer.name, layer.op_type, "x".join(map(str, layer.shape)), layer.status,
                      layer.algorithm, str(layer.bits or ""), layer.block, sq, *out,
                      "; ".join(x for x in (layer.reason, layer.detail) if x))
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    q = report.quantized
    sq = [layer.sqnr_db for layer in q if layer.sqnr_db is not None]
    console.print(
        f"[bold]{len(q)} of {len(report.layers)} weight nodes quantized[/]; "
        f"size {_mb(report.size_before)} -> {_mb(report.size_after)} "
        f"({size_change(report.size_before, report.size_after)}); "
        f"mean weight SQNR {sum(sq) / len(sq):.1f} dB; {report.seconds:.2f} s"
        if sq else f"{len(q)} weight nodes quantized; {report.seconds:.2f} s"
    )
    bpw = report.bits_per_weight()
    if bpw is not None:
        console.print(f"average {bpw:.3f} bits per quantized weight (scales and zero points included)")
    if report.accuracy:
        acc = report.accuracy
        console.print(f"[bold]accuracy vs FP32[/] on {acc.samples} samples of {acc.data}: "
                      f"{format_metrics(acc.metrics)}")
        note = nonfinite_note(acc.metrics)
        if note:
            console.print(f"[bold red]warning:[/] {note}")
