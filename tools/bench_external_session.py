"""Peak memory of a calibration session over an external-data model: the session onnxfgq uses now
(graph proto as bytes + the model folder; onnxruntime reads the original files) against what the
Collector did before (save a full copy of the model, weights included, into a temporary folder).

    python tools/bench_external_session.py --make build/bench-ext   # writes a 1 GiB model once
    /usr/bin/time -v python tools/bench_external_session.py build/bench-ext/big.onnx --mode bytes
    /usr/bin/time -v python tools/bench_external_session.py build/bench-ext/big.onnx --mode copy

Peak RSS comes from /usr/bin/time (outside the process), not from here.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path, nargs="?")
    ap.add_argument("--make", type=Path, metavar="DIR", help="write an 8-layer 4096x8192 model (1 GiB) into DIR")
    ap.add_argument("--mode", choices=["bytes", "copy"], default="bytes")
    args = ap.parse_args()
    if args.make:
        sys.path.insert(0, str(ROOT))
        from tests.helpers import write_large_model

        args.make.mkdir(parents=True, exist_ok=True)
        print(write_large_model(args.make / "big.onnx", k=4096, n=8192, layers=8), "bytes of weights")
        return 0
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxfgq.calibration.collect import exposing_model
    from onnxfgq.graph import external, io

    model = io.load(args.model)
    names = [node.outputs[0].name for node in model.graph][:2]
    exposed = exposing_model(model, names)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    started = time.perf_counter()
    if args.mode == "bytes":
        sess = external.session(exposed, so)
    else:
        with tempfile.TemporaryDirectory(dir=args.model.parent) as tmp:
            path = Path(tmp) / "exposed.onnx"
            ir.save(exposed, path, external_data="exposed.onnx.data", size_threshold_bytes=1 << 20)
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    k = int(model.graph.inputs[0].shape[1])
    x = np.random.default_rng(0).standard_normal((4, k)).astype(np.float32)
    sess.run(names, {model.graph.inputs[0].name: x})
    print(f"{args.mode}: session + one batch in {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
