"""MiniLM weight-only accuracy rows (issue 13's table): one `onnxfgq quantize` run per row, through the CLI.

    python -m models.minilm --out build/minilm
    python tools/bench_minilm_accuracy.py --minilm build/minilm [--rows NAME ...] [--calib FILE] [--out T.md]

Each row runs exactly

    onnxfgq quantize MODEL -o TMP/q.onnx --calibration text:CALIB --eval-data text:EVAL \\
        --eval-samples 512 --batch-size 64 --report TMP/r.json FLAGS

(the command of docs/BENCHMARKS.md, "MiniLM, int4 weight-only") and reads bits per weight, mean and min
cosine vs FP32 and the quantizer's time from the JSON report. Rows are printed as markdown as they finish;
the temporary folder is removed at the end. ``--calib`` defaults to ``calib.txt`` beside the model
(128 sentences, disjoint from ``eval.txt``); ``--calib-samples`` is passed when given.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ALL = "awq+gptq+clip"
ROWS: dict[str, list[str]] = {
    "rtn-channel": ["--algo", "rtn", "--granularity", "channel"],
    "gptq-channel": ["--algo", "gptq", "--granularity", "channel"],
    "all-channel": ["--algo", ALL, "--granularity", "channel"],
    "rtn-g128": ["--algo", "rtn"],
    "gptq-g128": ["--algo", "gptq"],
    "all-g128": ["--algo", ALL],
    "rtn-g32": ["--algo", "rtn", "--block-size", "32"],
    "gptq-g32": ["--algo", "gptq", "--block-size", "32"],
    "all-g32": ["--algo", ALL, "--block-size", "32"],
    "rtn-3bit-g128": ["--algo", "rtn", "--bits", "3", "--format", "custom"],
    "gptq-3bit-g128": ["--algo", "gptq", "--bits", "3", "--format", "custom"],
    "all-3bit-g128": ["--algo", ALL, "--bits", "3", "--format", "custom"],
    "all-g64": ["--algo", ALL, "--block-size", "64"],
    "all-adaptive-4.288": ["--algo", ALL, "--granularity", "adaptive", "--target-bits", "4.288"],
    "all-adaptive-4.6": ["--algo", ALL, "--granularity", "adaptive", "--target-bits", "4.6"],
    # adaptive against the fixed block of the same stored bits, plain GPTQ (issue 13)
    "gptq-g64": ["--algo", "gptq", "--block-size", "64"],
    "gptq-adaptive-4.288": ["--algo", "gptq", "--granularity", "adaptive", "--target-bits", "4.288"],
    "gptq-adaptive-4.5625": ["--algo", "gptq", "--granularity", "adaptive", "--target-bits", "4.5625"],
    "gptq-adaptive-5.125": ["--algo", "gptq", "--granularity", "adaptive", "--target-bits", "5.125"],
    # block by block, plain GPTQ and asymmetric calibration (GPTAQ, --gptaq; AWQ needs --engine whole)
    "blocks-g128": ["--algo", "gptq+clip", "--engine", "blocks"],
    "gptaq-g128": ["--algo", "gptq+clip", "--engine", "blocks", "--gptaq"],
    "blocks-3bit-g128": ["--algo", "gptq+clip", "--engine", "blocks", "--bits", "3", "--format", "custom"],
    "gptaq-3bit-g128": ["--algo", "gptq+clip", "--engine", "blocks", "--gptaq", "--bits", "3", "--format", "custom"],
}


def run_row(onnxfgq: str, model: Path, calib: Path, flags: list[str], tmp: Path,
            extra: list[str]) -> dict:
    out, report = tmp / "q.onnx", tmp / "r.json"
    cmd = [onnxfgq, "quantize", str(model), "-o", str(out), "--calibration", f"text:{calib}",
           "--eval-data", f"text:{model.parent / 'eval.txt'}", "--eval-samples", "512", "--batch-size", "64",
           "--report", str(report), *extra, *flags]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    data = json.loads(report.read_text())
    for p in tmp.iterdir():
        p.unlink()
    m = data["accuracy"]["metrics"]
    return dict(bits=data["bits_per_weight"], mean=float(m["cosine_mean"]), min=float(m["cosine_min"]),
                seconds=data["seconds"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", type=Path, default=Path("build/minilm"))
    ap.add_argument("--calib", type=Path, help="calibration sentences (default: calib.txt beside the model)")
    ap.add_argument("--calib-sentences", type=int,
                    help="calibrate on this many sentences of the calibration split (models/text.py, at most 580; "
                         "never an eval sentence) instead of --calib")
    ap.add_argument("--calib-samples", type=int)
    ap.add_argument("--rows", nargs="*", choices=sorted(ROWS), help="rows to run (default: all)")
    ap.add_argument("--onnxfgq", default=str(Path(sys.executable).with_name("onnxfgq")))
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    model = args.minilm / "model.onnx"
    calib = args.calib or args.minilm / "calib.txt"
    samples = args.calib_samples or args.calib_sentences
    extra = ["--calib-samples", str(samples)] if samples else []
    lines = ["| FLAGS | bits/weight | cosine mean | cosine min | quantize s |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as data:
        if args.calib_sentences:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's models/
            from models.text import sentences

            calib = Path(data) / "calib.txt"
            calib.write_text("\n".join(sentences("calib", args.calib_sentences)) + "\n")
        for name in args.rows or list(ROWS):
            flags = ROWS[name] + extra
            try:
                r = run_row(args.onnxfgq, model, calib, ROWS[name], Path(tmp), extra)
            except subprocess.CalledProcessError as exc:
                print(f"{name}: failed: {exc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            line = (f"| `{' '.join(flags)}` | {r['bits']:.3f} | {r['mean']:.4f} | {r['min']:.4f} "
                    f"| {r['seconds']:.1f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
