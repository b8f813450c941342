#!/usr/bin/env python
"""Decode and prefill tokens/s in onnxruntime-genai (CPU) of onnxfgq's int4 settings against the
builder's own int4 and FP32, on a random-weight Llama (models/llm_exports.py): the measurement
behind ``--target cpu`` (issue 9 item 6).

    python tools/bench_genai_speed.py --preset tiny --out build/bench-genai-tiny
    python tools/bench_genai_speed.py --preset 100m --out build/bench-genai-100m
    python tools/bench_genai_speed.py --preset 123m --out build/bench-genai-123m --blocks 128 --lm-head \
        --only "builder int4 b128,asym acc4 b128,sym acc4 b128 lm_head same"   # the issue's done-when rows

``--only`` also limits what is built (a 123M model takes minutes to export or quantize here).

Every model is a genai folder (onnxfgq's made by folder mode from the builder's fp32 folder). Runs
are interleaved (round r times every model once, in a fresh order) and the medians are reported, so
load from other processes hits every row alike; the machine is shared: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PRESETS = {  # LlamaDims fields; 100m: 8 x (hidden 768, ffn 2048) + untied 32000-row embedding and lm_head
    "tiny": {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "vocab": 2048, "context": 512},
    "100m": {"hidden": 768, "layers": 8, "heads": 12, "kv_heads": 4, "vocab": 32000, "intermediate": 2048,
             "context": 512},
    # models/llama.py LARGE (large_llama_hf): the 100M+ configuration, also in tools/bench_llm.py
    "123m": {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 16384, "intermediate": 2816,
             "context": 512},
}


def onnxfgq_rows(blocks: list[int]) -> list[tuple[str, dict]]:
    rows = []
    for sym in (False, True):
        for acc in (0, 4):
            for b in blocks:
                rows.append((f"onnxfgq {'sym' if sym else 'asym'} acc{acc} b{b}",
                             {"symmetric": sym, "accuracy_level": acc, "block_size": b}))
    return rows


def lm_head_rows(block: int) -> list[tuple[str, dict, str]]:
    """acc4 rows with the lm_head forced: 8 bits and float (sym), 4 bits like the rest (asym and sym;
    the acc4 rows above are --lm-head auto, which is 8 bits at accuracy_level 4)."""
    rows = [(f"onnxfgq sym acc4 b{block} lm_head {m}", {"symmetric": True, "accuracy_level": 4, "block_size": block}, m)
            for m in ("8", "float", "same")]
    rows.append((f"onnxfgq asym acc4 b{block} lm_head same", {"accuracy_level": 4, "block_size": block}, "same"))
    return rows


def wanted(label: str, only: list[str]) -> bool:
    return label == "FP32" or not only or any(s in label for s in only)


def build(out: Path, preset: str, blocks: list[int], lm_head: bool = False, only: list[str] = ()) -> dict[str, Path]:
    from models.llm_exports import export_builder, tiny_llama_hf
    from onnxfgq.config import LMHead, QuantizeConfig, Selection, WeightConfig
    from onnxfgq.folders import quantize_folder

    hf = tiny_llama_hf(out / "hf", **PRESETS[preset])
    models = {"FP32": out / "fp32"}
    if not (out / "fp32" / "genai_config.json").is_file():
        export_builder(hf, out / "fp32", "fp32")
    for b in sorted({32, 128} | set(blocks)):
        path = out / f"builder-int4-b{b}"
        if not wanted(f"builder int4 b{b} (sym acc4)", only):
            continue
        if not (path / "genai_config.json").is_file():
            export_builder(hf, path, "int4", {"block_size": b})
        models[f"builder int4 b{b} (sym acc4)"] = path
    for label, w in onnxfgq_rows(blocks):
        path = out / label.replace(" ", "-")
        if not wanted(label, only):
            continue
        if not (path / "genai_config.json").is_file():
            quantize_folder(out / "fp32", path, QuantizeConfig(weights=WeightConfig(**w)))
        models[label] = path
    for label, w, mode in lm_head_rows(max(blocks)) if lm_head else ():
        path = out / label.replace(" ", "-")
        if not wanted(label, only):
            continue
        if not (path / "genai_config.json").is_file():
            quantize_folder(out / "fp32", path, QuantizeConfig(weights=WeightConfig(**w),
                                                               selection=Selection(lm_head=LMHead(mode))))
        models[label] = path
    return models


def measure(folder: Path, prompt_len: int, new: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one greedy generation."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new, do_sample=False)
    gen = og.Generator(model, params)
    prompt = np.random.default_rng(0).integers(3, 500, prompt_len).astype(np.int32)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    t1 = time.perf_counter()
    steps = 0
    while not gen.is_done() and steps < new:
        gen.generate_next_token()
        steps += 1
    t2 = time.perf_counter()
    return prompt_len / (t1 - t0), steps / (t2 - t1)


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="cache folder of the models")
    ap.add_argument("--blocks", default="32,64,128", help="onnxfgq block sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (decode)")
    ap.add_argument("--lm-head", action="store_true", help="also rows with --lm-head 8 / float (largest block)")
    ap.add_argument("--only", default="", help="comma-separated substrings: measure only matching rows")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    models = build(args.out, args.preset, [int(b) for b in args.blocks.split(",")], args.lm_head, only)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(models)
        rng.shuffle(order)
        for k in order:
            runs[k].append(measure(models[k], args.prompt, args.new))
    fp32_decode = statistics.median(d for _, d in runs["FP32"])
    print(f"preset {args.preset}: {PRESETS[args.preset]}; prompt {args.prompt}, {args.new} new tokens, "
          f"{args.rounds} interleaved rounds (medians)\n")
    print("| model | size MB | prefill tok/s | decode tok/s | decode vs FP32 |")
    print("|---|---|---|---|---|")
    for k, rs in runs.items():
        pre, dec = statistics.median(p for p, _ in rs), statistics.median(d for _, d in rs)
        print(f"| {k} | {size_mb(models[k]):.1f} | {pre:.0f} | {dec:.0f} | {dec / fp32_decode:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
