"""``--rotate`` against no rotation, side by side: the trained test LLM's perplexity at int4 per-channel,
g128, g32 and 3-bit g128, for rtn, gptq and awq+gptq+clip, each with and without ``--rotate``.

    python tools/bench_rotate.py --model build/llama-genai --hf build/test-models/llama --out build/bench-rotate
    python tools/bench_rotate.py ... --only "g128" --algos rtn,gptq --seeds 0,1,2    # a subset, several seeds
    python tools/bench_rotate.py --model build/llama-genai --hf build/test-models/llama --out X --weights
        # why: per weight, kurtosis and int4 per-channel RTN error before and after the rotation

Each row is quantized with the command line as a user runs it (printed), from the builder's FP32 folder,
calibrated on ``HF/train.txt`` (the CLI's default 128 samples); then every output is evaluated in one
process against FP32 on the README's held-out windows (``onnxfgq eval FP32 OUT --perplexity
text:HF/heldout.txt --tokenizer HF``: 64 windows of 128 tokens, the same ``onnxfgq.lm_eval`` code).
The table gives perplexity, top-1 agreement with FP32 and the share of RTN's gap (same layout, no
rotation) that the row closes. Outputs are reused when ``--out`` already holds them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {"per-channel": ["--block-size", "0"], "g128": ["--block-size", "128"], "g32": ["--block-size", "32"],
           "3-bit g128": ["--bits", "3", "--block-size", "128"]}
ALGOS = ("rtn", "gptq", "awq+gptq+clip")


def quantize(src: Path, out: Path, flags: list[str], hf: Path) -> float:
    if (out / "model.onnx").is_file():
        return float("nan")
    cmd = [sys.executable, "-m", "onnxfgq.cli", "quantize", str(src), "-o", str(out), "--no-eval", *flags]
    if "--algo" in flags:
        cmd += ["--calibration", f"text:{hf / 'train.txt'}", "--tokenizer", str(hf)]
    print("  $", " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return time.perf_counter() - started


def weight_stats(model: Path, seed: int) -> str:
    """Kurtosis (3 = Gaussian; outlier rows raise it) and relative int4 per-channel RTN error of every
    MatMul weight, as the model holds it and after ``--rotate`` (readers with their norm's scale folded in)."""
    import numpy as np

    from onnxfgq.api import load_model
    from onnxfgq.config import Selection
    from onnxfgq.graph import rotate
    from onnxfgq.graph.targets import find_targets
    from onnxfgq.quant import compute_qparams, dequantize, quantize

    def stats(m) -> dict[str, tuple[float, float]]:
        out = {}
        for t in find_targets(m, Selection()):
            if t.kind != "matmul" or t.skip_reason:
                continue
            w = t.weight().astype(np.float64)
            c = w - w.mean()
            kurt = float((c ** 4).mean() / (c ** 2).mean() ** 2)
            qp = compute_qparams(w.astype(np.float32), (w.shape[0], 1), 4, symmetric=False, signed=False)
            err = dequantize(quantize(w.astype(np.float32), qp), qp) - w
            out[t.name] = (kurt, float(np.sqrt((err ** 2).sum() / (w ** 2).sum())))
        return out

    before = stats(load_model(model))
    rotated = load_model(model)
    rotate.apply(rotated, seed)
    after = stats(rotated)
    lines = ["| weight | kurtosis | kurtosis rotated | int4 per-channel RTN rel. error | rotated |", "|---|---|---|---|---|"]
    for name, (k, e) in before.items():
        k2, e2 = after.get(name, (float("nan"), float("nan")))
        lines.append(f"| {name} | {k:.2f} | {k2:.2f} | {e:.4f} | {e2:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="the builder's FP32 folder of the test LLM")
    ap.add_argument("--hf", type=Path, required=True, help="its Hugging Face folder (tokenizer, train/heldout.txt)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated layouts (default: all)")
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--seeds", default="0", help="--rotate-seed values (comma-separated)")
    ap.add_argument("--extra", default="", help="flags added to every quantize row, e.g. '--lm-head 8'")
    ap.add_argument("--weights", action="store_true", help="only the weight statistics (no quantize runs)")
    args = ap.parse_args()
    if args.weights:
        print(weight_stats(args.model / "model.onnx", int(args.seeds.split(",")[0])))
        return
    from onnxfgq.lm_eval import evaluate, text_windows

    layouts = [k for k in LAYOUTS if not args.only or k in args.only.split(",")]
    algos = args.algos.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for layout in layouts:
        for algo in algos:
            base = [*LAYOUTS[layout]] + (["--algo", algo] if algo != "rtn" else []) + args.extra.split()
            for rotate in [None, *seeds]:
                flags = base + ([] if rotate is None else ["--rotate", "--rotate-seed", str(rotate)])
                name = f"{layout.replace(' ', '')}-{algo}" + ("" if rotate is None else f"-rot{rotate}")
                name += "".join(f"_{x.strip('-')}" for x in args.extra.split())
                out = args.out / name
                seconds = quantize(args.model, out, flags, args.hf)
                rows.append({"layout": layout, "algo": algo, "rotate": rotate, "path": out, "seconds": seconds,
                             "flags": " ".join(flags)})
    windows = text_windows(args.hf / "heldout.txt", args.hf, 128, 64)
    fp32 = args.model / "model.onnx"
    ref = None
    for row in rows:
        custom = "--bits" in row["flags"]
        res = evaluate({"fp32": fp32, "q": row["path"] / "model.onnx"}, windows, custom_ops=custom)
        ref = res.perplexity["fp32"]
        row["ppl"], row["top1"] = res.perplexity["q"], res.top1_agreement
        print(f"{row['layout']:>12} {row['algo']:>14} rotate={row['rotate']!s:>4}  ppl {row['ppl']:.3f}  "
              f"top1 {row['top1']:.3f}", flush=True)
    lines = [f"FP32 perplexity {ref:.3f} ({len(windows)} windows of 128 tokens)", "",
             "| layout | algo | --rotate | perplexity | top-1 vs FP32 | RTN gap closed |", "|---|---|---|---|---|---|"]
    for row in rows:
        rtn = next(r for r in rows if r["layout"] == row["layout"] and r["algo"] == "rtn" and r["rotate"] is None)
        gap = rtn["ppl"] - ref
        closed = (rtn["ppl"] - row["ppl"]) / gap if gap > 0 else float("nan")
        rot = "no" if row["rotate"] is None else f"seed {row['rotate']}"
        lines.append(f"| {row['layout']} | {row['algo']} | {rot} | {row['ppl']:.3f} | {row['top1']:.3f} | "
                     f"{closed:.0%} |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "rows.json").write_text(json.dumps([{**r, "path": str(r["path"])} for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
