"""Issue 9's accuracy goal as a user meets it: the README's LLM setting (`--algo gptq --symmetric
--target cpu`, default calibration size) against onnxruntime-genai's builder int4 g128 default, on the
trained test LLM's builder FP32 folder, at equal or smaller size, scored on all held-out windows."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import cli


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def test_readme_llm_setting_closes_most_of_the_builder_int4_gap(exports, llama_hf, tmp_path):
    from models.llm_exports import export_builder
    from onnxfgq import lm_eval

    fp32 = exports("builder").parent
    builder = export_builder(llama_hf, tmp_path / "builder-int4", "int4", {"block_size": 128})
    ours = tmp_path / "onnxfgq-int4"
    proc = cli("quantize", fp32, "-o", ours, "--algo", "gptq", "--symmetric", "--target", "cpu", "--no-eval",
               "--calibration", f"text:{llama_hf / 'train.txt'}", "--tokenizer", llama_hf)
    assert proc.returncode == 0, proc.stderr
    assert _bytes(ours) <= _bytes(builder)

    windows = lm_eval.text_windows(llama_hf / "heldout.txt", llama_hf, 128)
    ppl = {}
    for name, folder in (("builder", builder), ("onnxfgq", ours)):
        res = lm_eval.evaluate({"fp32": fp32 / "model.onnx", name: folder / "model.onnx"}, windows)
        ppl["fp32"], ppl[name] = res.perplexity["fp32"], res.perplexity[name]
    closed = (ppl["builder"] - ppl["onnxfgq"]) / (ppl["builder"] - ppl["fp32"])
    print(f"\nperplexity {ppl}; builder gap closed {closed:.0%}")
    # Measured (docs/BENCHMARKS.md, stop 19): 75% on train.txt as written, 67-81% over five orders of
    # the calibration lines; RTN with the builder's layout closes 0%, asymmetric GPTQ 63%.
    assert ppl["builder"] > ppl["fp32"]
    assert closed >= 0.6, ppl
