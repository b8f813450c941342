#!/usr/bin/env python3
"""GPTQ on a model file with ``--engine whole`` or ``blocks``, and where its memory goes.

    /usr/bin/time -v python tools/bench_blocks_memory.py build/h6/llama-2048x4/model.onnx --engine blocks

Run it under ``/usr/bin/time -v`` for the peak RSS (measured from outside the process). Inside, a
thread samples the resident set every 0.2 s and reports the largest value seen during each phase
(the label of the progress step running: "block 3/9#1" is the statistics pass of block 3 on batch 1,
"quantizing#12" the solve and emission of weight 12), so the phase that sets the peak is visible.
Calibration: random feeds, batch 1, sequence 64, as in issue 11's measurement.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    from onnxfgq.api import quantize_file
    from onnxfgq.config import Algorithm, FeedConfig, QuantizeConfig, WeightConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--engine", choices=["whole", "blocks"], default="blocks")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()

    state: dict = {"label": "start", "peak": {}}

    def sample() -> None:
        while True:
            label = state["label"]
            state["peak"][label] = max(state["peak"].get(label, 0), _rss_mib())
            time.sleep(0.2)

    def progress(items, total, label):
        del total
        for i, item in enumerate(items):
            state["label"] = f"{label}#{i}"
            yield item
        state["label"] = f"after {label}"

    threading.Thread(target=sample, daemon=True).start()
    wc = WeightConfig(algorithm=Algorithm.GPTQ, calibration="random", calibration_samples=args.samples,
                      calibration_batch_size=args.samples, engine=args.engine)
    cfg = QuantizeConfig(weights=wc, feeds=FeedConfig(dims=(("batch", 1), ("seq", args.seq))))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-blocks-", dir=args.model.parent) as tmp:
        report = quantize_file(args.model, Path(tmp) / "model.onnx", cfg, progress=progress)
    state["label"] = "end"
    time.sleep(0.5)
    print(f"engine {args.engine}: {time.perf_counter() - started:.0f} s; notes: {' | '.join(report.notes)}")
    for label, mib in sorted(state["peak"].items(), key=lambda kv: -kv[1])[:12]:
        print(f"{mib:6d} MiB  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
