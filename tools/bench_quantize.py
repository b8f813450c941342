"""Quantization speed and memory: onnxfgq vs onnxruntime's own MatMulNBitsQuantizer, side by side.

    python tools/bench_quantize.py --model build/minilm/model.onnx --repeats 7

Both quantize the same in-memory ModelProto to int4, block 128, asymmetric RTN (MatMulNBits).
Runs alternate between the two tools, and the table shows medians. ``file`` adds loading and
saving (onnxfgq also runs onnx.checker and an onnxruntime load on its output before renaming it
into place). Peak memory is each tool's ru_maxrss in a fresh subprocess.

    python tools/bench_quantize.py --model build/h11/llama7b-12/model.onnx --outside --repeats 1

``--outside`` runs each tool file to file in its own process under ``/usr/bin/time -v`` (wall time
and peak RSS measured from outside the process, imports included), alternating, for models too big
to load twice in one process; the ModelProto of onnxruntime's tool is saved with external data when
the input has some.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def ort_quantize(proto, block: int):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(proto, bits=4, block_size=block, is_symmetric=False)
    q.process()
    return q.model.model


def ours_quantize(proto, block: int):
    import onnxfgq

    return onnxfgq.quantize(proto, onnxfgq.QuantizeConfig(weights=onnxfgq.WeightConfig(block_size=block))).model


def ort_file(src: Path, dst: Path, block: int) -> None:
    import onnx

    model = ort_quantize(onnx.load(src), block)
    external = any(p.name != src.name for p in src.parent.iterdir() if p.name.startswith(src.name))
    onnx.save(model, dst, save_as_external_data=external, location=dst.name + ".data" if external else None)


def ours_file(src: Path, dst: Path, block: int) -> None:
    import onnxfgq
    from onnxfgq.api import quantize_file

    quantize_file(src, dst, onnxfgq.QuantizeConfig(weights=onnxfgq.WeightConfig(block_size=block)))


def _peak_child(tool: str, model: Path, block: int) -> int:
    code = (
        "import logging, sys, tempfile, pathlib; logging.disable(logging.CRITICAL);"
        "sys.path.insert(0, 'tools'); import bench_quantize as b;"
        f"d = pathlib.Path(tempfile.mkdtemp()); b.{tool}_file(pathlib.Path({str(model)!r}), d / 'q.onnx', {block});"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec
        "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _outside(tool: str, model: Path, block: int, out: Path) -> tuple[float, int]:
    """One file-to-file run of ``tool`` under /usr/bin/time -v: (wall seconds, peak RSS bytes)."""
    code = (
        "import logging, sys, pathlib; logging.disable(logging.CRITICAL);"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_quantize as b;"
        f"b.{tool}_file(pathlib.Path({str(model)!r}), pathlib.Path({str(out)!r}), {block})"
    )
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if r.returncode:
        raise SystemExit(f"{tool} failed (exit {r.returncode}): {r.stderr[-2000:]}")
    wall = rss = 0.0
    for line in r.stderr.splitlines():
        line = line.strip()
        if line.startswith("Elapsed (wall clock) time"):
            parts = [float(x) for x in line.rsplit(" ", 1)[1].split(":")]
            wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
        elif line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(" ", 1)[1]) * 1024
    return wall, int(rss)


def main_outside(args) -> int:
    import os

    runs: dict[str, list[tuple[float, int]]] = {"ort": [], "ours": []}
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        for i in range(args.repeats):
            for tool in ("ort", "ours"):
                folder = Path(tmp) / f"{tool}-{i}"
                folder.mkdir()
                runs[tool].append(_outside(tool, args.model.resolve(), args.block_size, folder / "model.onnx"))
                print(f"{tool} run {i + 1}: {runs[tool][-1][0]:.1f} s, {runs[tool][-1][1] / 1e9:.2f} GB peak RSS, "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
                for p in folder.iterdir():
                    p.unlink()
    med = {t: (statistics.median(w for w, _ in r), max(m for _, m in r)) for t, r in runs.items()}
    print(f"{args.model}: int4 block {args.block_size} RTN, file to file, /usr/bin/time -v, median of {args.repeats}")
    print("| tool | wall | peak RSS |\n|---|---|---|")
    print(f"| onnxruntime MatMulNBitsQuantizer | {med['ort'][0]:.1f} s | {med['ort'][1] / 1e9:.2f} GB |")
    print(f"| onnxfgq | {med['ours'][0]:.1f} s | {med['ours'][1] / 1e9:.2f} GB |")
    print(f"speed-up {med['ort'][0] / med['ours'][0]:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs}, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/minilm/model.onnx"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--json", type=Path, help="write the medians here")
    ap.add_argument("--outside", action="store_true",
                    help="each run in its own process under /usr/bin/time -v (big models)")
    ap.add_argument("--out-dir", type=Path, default=None, help="--outside: where outputs are written (then deleted)")
    args = ap.parse_args()
    if args.outside:
        return main_outside(args)
    logging.disable(logging.CRITICAL)  # onnxruntime's quantizer logs every node at INFO
    import onnx

    proto = onnx.load(args.model)
    times: dict[str, list[float]] = {"ort memory": [], "onnxfgq memory": [], "ort file": [], "onnxfgq file": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats + 1):  # the first round warms imports and caches; not counted
            for name, fn in (("ort", ort_quantize), ("onnxfgq", ours_quantize)):
                copy = onnx.ModelProto.FromString(proto.SerializeToString())
                t = time.perf_counter()
                fn(copy, args.block_size)
                if i:
                    times[f"{name} memory"].append(time.perf_counter() - t)
            for name, fn in (("ort", ort_file), ("onnxfgq", ours_file)):
                dst = Path(tmp) / f"{name}-{i}.onnx"
                t = time.perf_counter()
                fn(args.model, dst, args.block_size)
                if i:
                    times[f"{name} file"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peaks = {tool: _peak_child(tool, args.model.resolve(), args.block_size) for tool in ("ort", "ours")}
    print(f"{args.model}: int4 block {args.block_size} RTN, median of {args.repeats} runs")
    print("| step | onnxruntime | onnxfgq | speed-up |")
    print("|---|---|---|---|")
    for step in ("memory", "file"):
        o, f = med[f"ort {step}"], med[f"onnxfgq {step}"]
        print(f"| {step} | {o:.3f} s | {f:.3f} s | {o / f:.2f}x |")
    print(f"| peak RSS (file) | {peaks['ort'] / 1e6:.0f} MB | {peaks['ours'] / 1e6:.0f} MB | |")
    if args.json:
        args.json.write_text(json.dumps({"median_s": med, "peak_rss": peaks}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
