"""Peak RSS of calibration as the number of samples grows (each size in a fresh subprocess).

    python tools/bench_calibration_memory.py [--sizes 256 2560 25600] [--batch-size 64]

Calibrates the demo CNN (models/cnn.py, built under build/cnn if missing) on random inputs with every
observer kind's state alive, and prints ru_maxrss per size. Observers keep fixed-size state, so the
peak should stay flat while the samples grow 10x and 100x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(model: str, samples: int, batch: int, observer: str) -> None:
    sys.path.insert(0, str(ROOT))
    import onnx_ir as ir

    from onnxfgq.calibration.sources import open_source
    from onnxfgq.config import ActivationConfig, ObserverKind
    from onnxfgq.graph.qdq_static import plan_static
    from onnxfgq.static import calibrate, prepare

    act = ActivationConfig(observer=ObserverKind(observer), num_samples=samples, batch_size=batch)
    prepared, _ = prepare(ir.load(model))
    plan = plan_static(prepared.graph)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    reader = open_source("random", prepared, num_samples=samples, batch_size=batch)
    ranges = calibrate(prepared, plan, reader, act)
    print(json.dumps({"samples": ranges.samples, "tensors": len(ranges.ranges),
                      "seconds": time.perf_counter() - started, "rss_before_mb": before / 1024,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 2560, 25600])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--observer", default="mse")
    ap.add_argument("--model", default=None, help="ONNX model (default: the demo CNN)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.model, args.child, args.batch_size, args.observer)
        return
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from models.cnn import export

        model = str(export(ROOT / "build" / "cnn"))
    print(f"model {model}, batch {args.batch_size}, observer {args.observer} (+ the histogram kept for SNR)")
    print(f"{'samples':>8} {'tensors':>8} {'seconds':>8} {'RSS before MB':>14} {'peak RSS MB':>12}")
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--model", model, "--batch-size",
                              str(args.batch_size), "--observer", args.observer],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['samples']:>8} {r['tensors']:>8} {r['seconds']:>8.2f} {r['rss_before_mb']:>14.1f} "
              f"{r['peak_rss_mb']:>12.1f}")


if __name__ == "__main__":
    main()
