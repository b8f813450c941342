#!/usr/bin/env python
"""Accuracy side of ``--target cpu`` (symmetric + MatMulNBits accuracy_level 4): the same int4 settings
as tools/bench_genai_speed.py measured on the real MiniLM (sentence-embedding cosine vs FP32, run by
onnxruntime on CPU, so accuracy_level 4's int8 activations are in the numbers) and, with
``--llm HF_DIR``, on a Llama's builder export (perplexity and next-token top-1 vs FP32, lm_eval).

    python tools/bench_cpu_target_accuracy.py --minilm build/minilm [--llm build/llm/hf --text FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = [  # label, WeightConfig fields
    ("asym acc0 (default)", {}),
    ("asym acc4", {"accuracy_level": 4}),
    ("sym acc0", {"symmetric": True}),
    ("sym acc4 (--target cpu)", {"symmetric": True, "accuracy_level": 4}),
]


def minilm_rows(folder: Path, samples: int, algos_wanted: list[str]) -> list[str]:
    from onnxfgq import QuantizeConfig, WeightConfig
    from onnxfgq.api import quantize_file
    from onnxfgq.calibration import open_source
    from onnxfgq.config import Algorithm
    from onnxfgq.evaluate import compare
    from onnxfgq.graph import io

    model = folder / "model.onnx"
    calib = {"calibration": f"text:{folder / 'calib.txt'}"}
    algos = [(a, {"algorithm": Algorithm(a), **(calib if a != "rtn" else {})}) for a in algos_wanted]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo, extra in algos:
            for label, kw in SETTINGS:
                out = Path(tmp) / "q.onnx"
                quantize_file(model, out, QuantizeConfig(weights=WeightConfig(**kw, **extra)))
                reader = open_source(f"text:{folder / 'eval.txt'}", io.load(model), num_samples=samples,
                                     batch_size=64)
                metrics, n = compare(model, out, reader)
                rows.append(f"| MiniLM int4 g128 {algo} | {label} | cosine {metrics['cosine_mean']:.4f} ({n} sentences) |")
                print(rows[-1], file=sys.stderr)
    return rows


def llm_rows(hf: Path, text: Path, work: Path, window: int, windows: int) -> list[str]:
    from models.llm_exports import export_builder
    from onnxfgq import QuantizeConfig, WeightConfig, lm_eval
    from onnxfgq.folders import quantize_folder

    fp32 = work / "fp32"
    if not (fp32 / "genai_config.json").is_file():
        export_builder(hf, fp32, "fp32")
    data = lm_eval.text_windows(text, hf, window, windows)
    rows = []
    for label, kw in SETTINGS:
        out = work / label.split(" (")[0].replace(" ", "-")
        if not (out / "genai_config.json").is_file():
            quantize_folder(fp32, out, QuantizeConfig(weights=WeightConfig(**kw)))
        res = lm_eval.evaluate({"fp32": fp32 / "model.onnx", "q": out / "model.onnx"}, data)
        rows.append(f"| LLM int4 g128 rtn | {label} | perplexity {res.perplexity['q']:.3f} (FP32 "
                    f"{res.perplexity['fp32']:.3f}), next-token top-1 {res.top1_agreement:.4f} |")
        print(rows[-1], file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", type=Path, help="folder of models/minilm.py's export (model.onnx, eval.txt)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--algos", default="rtn", help="MiniLM rows: comma-separated algorithms (rtn,awq+gptq+clip)")
    ap.add_argument("--llm", type=Path, help="a Hugging Face Llama folder (exported with the builder here)")
    ap.add_argument("--text", type=Path, help="held-out text for the LLM rows")
    ap.add_argument("--work", type=Path, default=Path("build/bench-cpu-target"))
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64)
    args = ap.parse_args(argv)
    rows = []
    if args.minilm:
        rows += minilm_rows(args.minilm, args.samples, args.algos.split(","))
    if args.llm:
        rows += llm_rows(args.llm, args.text, args.work, args.window, args.windows)
    print("| model | setting | accuracy vs FP32 |\n|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
