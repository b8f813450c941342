"""LLM decoders side by side, in one run: onnxfgq's int4 against FP32 and onnxruntime-genai's own
builder int4, on the trained test LLM (accuracy) and a random-weight 123M Llama (speed).

    python tools/bench_llm.py --out build/bench-llm                     # accuracy table, trained LLM
    python tools/bench_llm.py --out build/bench-llm --speed --models large  # genai decode/prefill tok/s, 123M

Per row: perplexity on the held-out docstrings (windows of --window tokens, onnxfgq.lm_eval),
teacher-forced next-token top-1 agreement with FP32, size of the model files, and with --speed the
median decode and prefill tokens/s of several runs in onnxruntime-genai on CPU (one batch, greedy).
Rows: FP32; the builder's ``-p int4`` with algo_config rtn / k_quant / k_quant_mixed at block 32 and
128 (its CPU defaults: symmetric, accuracy_level 4); onnxfgq on the builder's FP32 folder (folder
mode, so the output runs in genai) and on the torch exports (accuracy only: genai runs genai folders).
The machine is shared: speed ratios measured in one run are meaningful, absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUILDER_INT4 = [(algo, block) for block in (32, 128) for algo in ("default", "rtn", "k_quant", "k_quant_mixed")]
# (label, extra onnxfgq flags); block size is added per row.
ONNXFGQ = {
    "rtn": [],
    "rtn --target cpu": ["--target", "cpu"],
    "gptq": ["--algo", "gptq"],
    "awq+gptq+clip": ["--algo", "awq+gptq+clip"],
    "gptq --target cpu": ["--algo", "gptq", "--target", "cpu"],
    "gptq --symmetric --target cpu": ["--algo", "gptq", "--symmetric", "--target", "cpu"],  # README's LLM setting
    "awq+gptq+clip --target cpu": ["--algo", "awq+gptq+clip", "--target", "cpu"],
}


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx")) / 1e6


def quantize(src: Path, out: Path, flags: list[str], calib: Path, tokenizer: Path) -> float:
    """onnxfgq quantize as a user runs it; returns seconds."""
    if out.exists():
        return float("nan")  # reused from an earlier run of the same --out
    calibrated = any(a in flags for a in ("gptq", "awq+gptq+clip", "awq", "clip"))
    cal = ["--calibration", f"text:{calib}", "--tokenizer", str(tokenizer), "--calib-samples", "16"] if calibrated \
        else []
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxfgq.cli", "quantize", str(src), "-o", str(out), "--no-eval",
                           *flags, *cal], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"onnxfgq quantize {src} {' '.join(flags)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - started


def genai_run(model, prompt: list[int], decode: int) -> tuple[float, float]:
    """One greedy generation: (prefill tok/s, decode tok/s)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + decode, min_length=len(prompt) + decode, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def genai_speeds(rows: list[dict], folders: list[Path], prompt: list[int], decode: int, runs: int) -> None:
    """Medians over ``runs`` interleaved rounds (each round runs every model once, in a shuffled
    order, after one warm-up each), so load from other jobs falls on every row alike."""
    import random

    import onnxruntime_genai as og

    models = [og.Model(str(f)) for f in folders]
    for m in models:
        genai_run(m, prompt, 4)
    pre: list[list[float]] = [[] for _ in models]
    dec: list[list[float]] = [[] for _ in models]
    rng = random.Random(0)
    for _ in range(runs):
        order = list(range(len(models)))
        rng.shuffle(order)
        for i in order:
            p, d = genai_run(models[i], prompt, decode)
            pre[i].append(p)
            dec[i].append(d)
    for row, p, d in zip(rows, pre, dec, strict=True):
        row["prefill_tok_s"], row["decode_tok_s"] = round(statistics.median(p), 1), round(statistics.median(d), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "bench-llm")
    ap.add_argument("--speed", action="store_true", help="measure genai decode/prefill tokens/s")
    ap.add_argument("--models", default="trained", help="comma list: trained (accuracy, 1M test LLM), "
                    "large (speed only, random-weight 123M)")
    ap.add_argument("--llama", type=Path, default=ROOT / "build" / "test-models" / "llama",
                    help="trained test LLM folder (trained there if missing; tests use the same cache)")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--torch-exports", action="store_true", help="also onnxfgq on the torch dynamo/legacy exports")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    from models import llm_exports as ex
    from models.llama import large_llama_hf, trained_llama_hf
    from onnxfgq import lm_eval

    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    hf = trained_llama_hf(args.llama)
    calib = args.out / "calib.txt"
    calib.write_text("\n".join((hf / "train.txt").read_text().splitlines()[:128]) + "\n")
    windows = lm_eval.text_windows(hf / "heldout.txt", hf, args.window)
    rows: list[dict] = []
    failed: list[dict] = []

    def folder_rows(base: Path, tag: str, hf_dir: Path, accuracy: bool) -> None:
        fp32 = base / "fp32"
        if not fp32.exists():
            ex.export_builder(hf_dir, fp32, "fp32")
        variants = [("fp32", "FP32", fp32, None)]
        for algo, block in BUILDER_INT4:
            if block in blocks and (accuracy or algo == "default"):  # same kernels: speed needs one algo
                out = base / f"builder-{algo}-g{block}"
                if not out.exists():
                    try:
                        ex.export_builder(hf_dir, out, "int4", {"algo_config": algo, "block_size": block})
                    except RuntimeError as exc:  # a builder bug is a result too: record it, go on
                        failed.append({"model": tag, "tool": "builder int4", "setting": f"{algo} g{block}",
                                       "error": str(exc).strip().splitlines()[-1]})
                        print(json.dumps(failed[-1]), flush=True)
                        continue
                variants.append(("builder int4", f"{algo} g{block}", out, None))
        for label, flags in ONNXFGQ.items():
            if not accuracy and "gptq" in label:
                continue  # speed-only config: calibration changes weights, not speed
            for block in blocks:
                out = base / f"onnxfgq-{label.replace(' ', '-').replace('+', '_')}-g{block}"
                secs = quantize(fp32, out, [*flags, "--block-size", str(block)], calib, hf_dir)
                variants.append(("onnxfgq", f"{label} g{block}", out, secs))
        new: list[dict] = []
        cache_file = base / "accuracy.json"
        cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
        for tool, setting, folder, secs in variants:
            row = {"model": tag, "export": "builder folder", "tool": tool, "setting": setting,
                   "size_mb": round(size_mb(folder), 2)}
            if secs is not None and not math.isnan(secs):
                row["quantize_s"] = round(secs, 1)
            if accuracy:
                key = f"{tool} {setting}"
                if key not in cache:  # outputs are reused across runs of one --out: so are their scores
                    res = lm_eval.evaluate({"fp32": fp32 / "model.onnx", "q": folder / "model.onnx"}, windows,
                                           batch_size=1)
                    cache[key] = {"perplexity": round(res.perplexity["q"], 4),
                                  "top1_vs_fp32": round(res.top1_agreement, 4)}
                    cache_file.write_text(json.dumps(cache, indent=1) + "\n")
                row.update(cache[key])
            new.append(row)
            print(json.dumps(row), flush=True)
        if args.speed:
            context = json.loads((fp32 / "genai_config.json").read_text())["model"]["context_length"]
            prompt = windows.reshape(-1)[: min(args.prompt, context - args.decode)].tolist()
            genai_speeds(new, [v[2] for v in variants], prompt, args.decode, args.runs)
            for row in new:
                print(json.dumps(row), flush=True)
        rows.extend(new)

    if "trained" in models:
        folder_rows(args.out / "trained", "trained 1M", hf, accuracy=True)
    if args.torch_exports:
        for route in ("legacy", "dynamo"):
            fp32 = ex.export_torch(hf, args.out / route / "fp32" / "model.onnx", dynamo=route == "dynamo")
            for label, flags in ONNXFGQ.items():
                out = args.out / route / f"onnxfgq-{label.replace(' ', '-').replace('+', '_')}-g128" / "model.onnx"
                out.parent.mkdir(parents=True, exist_ok=True)
                quantize(fp32, out, [*flags, "--block-size", "128"], calib, hf)
                res = lm_eval.evaluate({"fp32": fp32, "q": out}, windows, batch_size=4)
                row = {"model": "trained 1M", "export": f"torch {route}", "tool": "onnxfgq",
                       "setting": f"{label} g128", "size_mb": round(size_mb(out.parent), 2),
                       "perplexity": round(res.perplexity["q"], 4), "top1_vs_fp32": round(res.top1_agreement, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if "large" in models:
        big = large_llama_hf(args.out / "llama-123m")
        folder_rows(args.out / "large", "random 123M", big, accuracy=False)
    (args.out / "results.json").write_text(json.dumps(rows + failed, indent=1) + "\n")
    print_table(rows)
    for f in failed:
        print(f"failed: {f['tool']} {f['setting']}: {f['error']}")


def print_table(rows: list[dict]) -> None:
    cols = ["model", "export", "tool", "setting", "size_mb", "perplexity", "top1_vs_fp32", "prefill_tok_s",
            "decode_tok_s"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
