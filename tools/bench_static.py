"""Static int8 on the demo CNN: speed and agreement vs FP32, ours and onnxruntime's quantize_static.

    python tools/bench_static.py [--repeats 30] [--batches 1 64] [--threads 2]

Both quantizers calibrate on the same training images (build/cnn/calib) and are evaluated on the
held-out digits; latencies are medians of ``--repeats`` runs of one batch, all models timed side by
side in the same process (interleaved), so machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _ours(model: Path, calib: Path, out: Path) -> float:
    from onnxfgq.config import ActivationConfig, QuantizeConfig
    from onnxfgq.static import quantize_static_file

    started = time.perf_counter()
    quantize_static_file(model, out, QuantizeConfig(activations=ActivationConfig(calibration=str(calib),
                                                                                 num_samples=256)))
    return time.perf_counter() - started


def _ort(model: Path, calib: Path, out: Path) -> float:
    import onnx_ir as ir
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from onnxfgq.calibration.sources import open_source
    from onnxfgq.static import LimitedReader

    reader = LimitedReader(open_source(str(calib), ir.load(model)), 256)
    started = time.perf_counter()
    quantize_static(str(model), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from models.cnn import export

    cnn = ROOT / "build" / "cnn"
    fp32 = export(cnn)
    x = np.concatenate([np.load(p)["input"] for p in sorted((cnn / "heldout").glob("*.npz"))])
    labels = np.load(cnn / "heldout_labels.npy")
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp) / "ours.onnx", Path(tmp) / "ort.onnx"
        t_ours = _ours(fp32, cnn / "calib", ours)
        t_ort = _ort(fp32, cnn / "calib", theirs)
        models = {"fp32": fp32, "onnxfgq int8": ours, "ort quantize_static int8": theirs}
        sessions = {k: _session(p, args.threads) for k, p in models.items()}
        logits = {k: s.run(None, {"input": x})[0] for k, s in sessions.items()}
        sizes = {k: p.stat().st_size for k, p in models.items()}
        times: dict[tuple[str, int], list[float]] = {}
        for batch in args.batches:
            feed = {"input": x[:batch]}
            for s in sessions.values():
                for _ in range(3):
                    s.run(None, feed)
            for _ in range(args.repeats):
                for k, s in sessions.items():  # interleaved: noise hits every model alike
                    t = time.perf_counter()
                    s.run(None, feed)
                    times.setdefault((k, batch), []).append(time.perf_counter() - t)
    print(f"CNN {fp32.name}: {len(labels)} held-out digits; quantization time: onnxfgq {t_ours:.2f} s "
          f"(includes guard), ort {t_ort:.2f} s")
    head = " | ".join(f"batch {b} median ms (x FP32)" for b in args.batches)
    print(f"| model | top-1 agreement vs FP32 | accuracy | size KB | {head} |")
    print("|---|---|---|---|" + "---|" * len(args.batches))
    for k in models:
        agree = float((logits[k].argmax(1) == logits["fp32"].argmax(1)).mean())
        acc = float((logits[k].argmax(1) == labels).mean())
        cells = []
        for b in args.batches:
            med = statistics.median(times[(k, b)]) * 1e3
            ref = statistics.median(times[("fp32", b)]) * 1e3
            cells.append(f"{med:.3f} ({ref / med:.2f}x)")
        print(f"| {k} | {agree:.4f} | {acc:.4f} | {sizes[k] / 1e3:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
