#!/usr/bin/env python
"""What ``--lm-head same|8|float`` costs and buys on the trained test LLM (models/llama.py), exported
with onnxruntime-genai's builder and quantized in folder mode: size, held-out perplexity and
next-token top-1 agreement with FP32 (onnxfgq/lm_eval.py). Decode speed of the same choices:
``tools/bench_genai_speed.py --lm-head``.

    python tools/bench_lm_head.py --llm build/test-models/llama --work build/bench-lm-head
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from models.llm_exports import export_builder
    from onnxfgq import lm_eval
    from onnxfgq.config import Algorithm, LMHead, QuantizeConfig, Selection, WeightConfig
    from onnxfgq.folders import quantize_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", type=Path, default=Path("build/test-models/llama"), help="trained HF folder")
    ap.add_argument("--work", type=Path, default=Path("build/bench-lm-head"))
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--windows", type=int, default=0, help="0 = the whole held-out text")
    ap.add_argument("--algo", default="rtn", help="rtn, or gptq / awq+gptq (calibrated on train.txt)")
    ap.add_argument("--embeddings", action="store_true", help="also --quantize-embeddings")
    args = ap.parse_args(argv)
    fp32 = args.work / "fp32"
    if not (fp32 / "genai_config.json").is_file():
        export_builder(args.llm, fp32, "fp32")
    data = lm_eval.text_windows(args.llm / "heldout.txt", args.llm, args.window, args.windows)
    calib = {} if args.algo == "rtn" else {"calibration": f"text:{args.llm / 'train.txt'}", "calibration_samples": 64}
    rows = []
    for sym, acc in ((False, 0), (True, 4)):
        for mode in LMHead:
            tag = f"{args.algo}-{'sym-acc4' if sym else 'asym-acc0'}-lm-{mode.value}{'-emb' if args.embeddings else ''}"
            out = args.work / tag
            if not (out / "genai_config.json").is_file():
                cfg = QuantizeConfig(weights=WeightConfig(symmetric=sym, accuracy_level=acc, algorithm=Algorithm(args.algo),
                                                          **calib),
                                     selection=Selection(lm_head=mode, quantize_embeddings=args.embeddings))
                quantize_folder(fp32, out, cfg)
            res = lm_eval.evaluate({"fp32": fp32 / "model.onnx", "q": out / "model.onnx"}, data)
            size = sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6
            rows.append(f"| {args.algo} g128 {'sym acc4' if sym else 'asym acc0'} | {mode.value} | {size:.2f} | "
                        f"{res.perplexity['q']:.3f} | {res.top1_agreement:.4f} |")
            print(rows[-1], file=sys.stderr)
            fp32_ppl = res.perplexity["fp32"]
    fp32_size = sum(p.stat().st_size for p in fp32.glob("model.onnx*")) / 1e6
    print(f"{len(data)} held-out windows of {args.window} tokens; FP32: {fp32_size:.2f} MB, perplexity {fp32_ppl:.3f}\n")
    print("| weights | --lm-head | size MB | perplexity | next-token top-1 vs FP32 |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
