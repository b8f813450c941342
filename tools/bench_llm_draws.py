#!/usr/bin/env python
"""The test LLM's accuracy targets (issues 9 and 13) over several calibration draws.

One quantization is one draw: GPTQ-style methods are chaotic at the level of single codes (a
flipped rounding early in a row changes the rest of the row), so a single run's perplexity is one
sample of a spread. This tool quantizes the builder's FP32 folder once per (configuration, draw),
where draw k calibrates on the training paragraphs shuffled with seed k (draw 0: train.txt as it
is), evaluates every output on all held-out windows, and prints per configuration the median,
min and max perplexity and the median share of a reference gap closed.

    python tools/bench_llm_draws.py --fp32 build/h19/genai-fp32 --hf build/test-models/llama \\
        --out build/h19/draws --draws 3 --samples 1024 \\
        --config "rtn=--algo rtn" --config "gptaq sym=--algo gptq --engine blocks --gptaq --symmetric" \\
        --baseline "builder int4 g128=build/h19/builder-int4-g128"

Each configuration's flags are passed to ``onnxfgq quantize`` as written (``--block-size 128`` and
``--calib-samples`` SAMPLES unless the flags give them); configurations without calibration (rtn) run once. Baselines are
model folders evaluated as they are. Results accumulate in OUT/results.jsonl, so an interrupted
run continues where it stopped and rows can be added later.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CALIBRATED = ("gptq", "awq", "clip")


def calibration_file(hf: Path, out: Path, draw: int) -> Path:
    """Draw 0: the training text as it is; draw k: its lines shuffled with seed k."""
    if draw == 0:
        return hf / "train.txt"
    path = out / f"calib-draw{draw}.txt"
    if not path.is_file():
        lines = (hf / "train.txt").read_text().splitlines()
        random.Random(draw).shuffle(lines)
        path.write_text("\n".join(lines) + "\n")
    return path


def size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def quantize(src: Path, dst: Path, flags: list[str], calib: Path, hf: Path, samples: int) -> float:
    cmd = [sys.executable, "-m", "onnxfgq.cli", "quantize", str(src), "-o", str(dst), "--no-eval", *flags]
    if "--block-size" not in flags:
        cmd += ["--block-size", "128"]
    if any(a in " ".join(flags) for a in CALIBRATED):
        cmd += ["--calibration", f"text:{calib}", "--tokenizer", str(hf)]
        if "--calib-samples" not in flags:
            cmd += ["--calib-samples", str(samples)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def evaluate(fp32: Path, model: Path, windows) -> tuple[float, float, float]:
    """(FP32 perplexity, the model's perplexity, top-1 agreement) on ``windows``."""
    from onnxfgq import lm_eval

    res = lm_eval.evaluate({"reference": fp32 / "model.onnx", "candidate": model / "model.onnx"}, windows)
    return res.perplexity["reference"], res.perplexity["candidate"], res.top1_agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", type=Path, required=True, help="the builder's FP32 genai folder")
    ap.add_argument("--hf", type=Path, required=True, help="the test LLM's HF folder (tokenizer, train/heldout)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", action="append", default=[], metavar="LABEL=FLAGS")
    ap.add_argument("--baseline", action="append", default=[], metavar="LABEL=FOLDER")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024, help="calibration samples per draw")
    ap.add_argument("--gap-from", action="append", default=[], metavar="LABEL",
                    help="a label whose (median) gap to FP32 a 'gap closed' column refers to (default: rtn)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized folders")
    args = ap.parse_args()

    from onnxfgq import lm_eval

    (args.out / "models").mkdir(parents=True, exist_ok=True)
    windows = lm_eval.text_windows(args.hf / "heldout.txt", args.hf, 128)
    results = args.out / "results.jsonl"
    done = {}
    if results.is_file():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            done[(row["label"], row["draw"])] = row

    def record(row: dict) -> None:
        done[(row["label"], row["draw"])] = row
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['label']:<40} draw {row['draw']}  ppl {row['perplexity']:.4f}  top-1 {row['top1']:.3f}  "
              f"{row['bytes']:,} B  {row.get('seconds', 0):.0f} s", flush=True)

    for spec in args.baseline:
        label, folder = spec.split("=", 1)
        if (label, 0) not in done:
            ref, ppl, top1 = evaluate(args.fp32, Path(folder), windows)
            record({"label": label, "draw": 0, "perplexity": ppl, "fp32": ref, "top1": top1,
                    "bytes": size_bytes(Path(folder))})
    for spec in args.config:
        label, flags = spec.split("=", 1)
        flags = shlex.split(flags)
        draws = range(args.draws) if any(a in " ".join(flags) for a in CALIBRATED) else range(1)
        for draw in draws:
            if (label, draw) in done:
                continue
            dst = args.out / "models" / f"{label.replace(' ', '_').replace('/', '_')}-d{draw}"
            seconds = quantize(args.fp32, dst, flags, calibration_file(args.hf, args.out, draw), args.hf,
                               args.samples)
            ref, ppl, top1 = evaluate(args.fp32, dst, windows)
            record({"label": label, "draw": draw, "flags": flags, "perplexity": ppl, "fp32": ref, "top1": top1,
                    "bytes": size_bytes(dst), "seconds": seconds})
            if not args.keep:
                subprocess.run(["rm", "-rf", str(dst)], check=True)

    summary(done, args.gap_from or ["rtn"], len(windows))


def summary(done: dict, gap_from: list[str], n_windows: int) -> None:
    """Markdown: per configuration the median, range and top-1 over draws, and the share of each
    reference's median gap to FP32 that the median closes."""
    fp32 = next(iter(done.values()))["fp32"] if done else float("nan")
    medians = {}
    for label in dict.fromkeys(lab for lab, _ in done):
        medians[label] = statistics.median(r["perplexity"] for (lab, _), r in done.items() if lab == label)
    gaps = {g: medians[g] - fp32 for g in gap_from if g in medians}
    print(f"\n{n_windows} windows of 128 held-out tokens; FP32 perplexity {fp32:.4f}; "
          + "; ".join(f"{g} gap {gap:.4f}" for g, gap in gaps.items()) + "\n")
    print("| configuration | draws | bytes | perplexity median | min - max | top-1 median | "
          + " | ".join(f"{g} gap closed" for g in gaps) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(gaps))
    for label, med in medians.items():
        rows = [r for (lab, _), r in sorted(done.items()) if lab == label]
        ppl = [r["perplexity"] for r in rows]
        shares = " | ".join(f"{(medians[g] - med) / gap:.0%}" for g, gap in gaps.items())
        print(f"| {label} | {len(rows)} | {rows[0]['bytes']:,} | {med:.4f} | {min(ppl):.4f} - {max(ppl):.4f} | "
              f"{statistics.median(r['top1'] for r in rows):.3f} | {shares} |")

if __name__ == "__main__":
    main()
