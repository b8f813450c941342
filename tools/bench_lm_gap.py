#!/usr/bin/env python
"""Where a quantized decoder's perplexity gap to FP32 comes from, per position: perplexity, top-1
agreement, mean KL divergence to FP32, the NLL change at targets of one token (the newline by
default) and the perplexity without the positions that read or predict it. With ``--fake-quant``,
also FP32 graphs whose MatMul weights are replaced by fake-quantized ones (dequantized, stored as
float), so a grid can be tried on some weights only (``mlas:lm_head``, ``asym:layers``, ...).

    python tools/bench_lm_gap.py build/h9/fp32 build/h9/builder-int4 build/h9/onnxfgq-gptq \\
        --text build/test-models/llama/heldout.txt --tokenizer build/test-models/llama
    python tools/bench_lm_gap.py build/h9/fp32 --fake-quant mlas,asym,mlas:lm_head,mlas:layers ...

Same windows as ``onnxfgq eval --perplexity`` (onnxfgq.lm_eval: 64 windows of 128 tokens by default).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log_probs(model: Path, reference: Path, windows: np.ndarray) -> np.ndarray:
    """[windows, T-1, vocab] float64 log-probabilities of the next token."""
    from onnxfgq import lm_eval

    sess = lm_eval._session(model, False)
    feed = lm_eval.decoder_inputs(sess, model, reference)
    out = []
    for i in range(0, len(windows), 4):
        logits = sess.run([feed.logits], feed.feed(windows[i:i + 4]))[0][:, :-1].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        out.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    return np.concatenate(out)


# ---------------------------------------------------------------- fake-quantized 4-bit grids, [K, N]
def _blocks(w: np.ndarray, bs: int) -> np.ndarray:
    k, n = w.shape
    return np.pad(w, ((0, -k % bs), (0, 0))).T.reshape(n, -1, bs)


def _unblocks(b: np.ndarray, k: int) -> np.ndarray:
    return b.reshape(b.shape[0], -1)[:, :k].T


def fq_asym(w: np.ndarray, bs: int) -> np.ndarray:
    b = _blocks(w, bs)
    lo, hi = np.minimum(b.min(-1, keepdims=True), 0), np.maximum(b.max(-1, keepdims=True), 0)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    z = np.clip(np.round(-lo / s), 0, 15)
    return _unblocks((np.clip(np.round(b / s) + z, 0, 15) - z) * s, w.shape[0])


def fq_sym75(w: np.ndarray, bs: int) -> np.ndarray:
    """onnxfgq's symmetric rule before: absmax / 7.5, zero point 8."""
    b = _blocks(w, bs)
    s = np.abs(b).max(-1, keepdims=True) / 7.5
    s = np.where(s > 0, s, 1.0)
    return _unblocks((np.clip(np.round(b / s) + 8, 0, 15) - 8) * s, w.shape[0])


def fq_mlas(w: np.ndarray, bs: int) -> np.ndarray:
    """onnxruntime's MLAS symmetric rule (the builder's default): scale = -extreme / 8."""
    b = _blocks(w, bs)
    ext = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
    s = np.where(ext != 0, -ext / 8, 1.0)
    return _unblocks((np.clip(np.round(b / s) + 8, 0, 15) - 8) * s, w.shape[0])


GRIDS = {"asym": fq_asym, "sym75": fq_sym75, "mlas": fq_mlas}


def fake_quant_folder(reference: Path, spec: str, block: int, work: Path) -> Path:
    """A copy of the reference folder with fake-quantized MatMul weights: ``GRID`` (all), ``GRID:lm_head``
    (only the lm_head, the rest asym), ``GRID:layers`` (all but the lm_head, which gets asym)."""
    import onnx
    from onnx import numpy_helper

    grid, _, where = spec.partition(":")
    out = work / spec.replace(":", "-")
    out.mkdir(parents=True)
    for f in reference.iterdir():
        if not f.name.startswith("model.onnx"):
            shutil.copy(f, out / f.name)
    model = onnx.load(str(reference / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    logits = {o.name for o in model.graph.output if "logits" in o.name}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        is_head = any(o in logits for o in node.output) or "lm_head" in node.name
        chosen = grid if (not where or (where == "lm_head") == is_head) else "asym"
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(GRIDS[chosen](w, block).astype(np.float32),
                                                             node.input[1]))
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out


def main(argv: list[str] | None = None) -> int:
    from onnxfgq import lm_eval

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path, help="the FP32 folder (or model.onnx)")
    ap.add_argument("candidates", type=Path, nargs="*", help="quantized folders (or model files)")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--windows", type=int, default=64, help="0 = all")
    ap.add_argument("--token", default="\n", help="the text whose token is split out (default: newline)")
    ap.add_argument("--fake-quant", default="", help="comma list of GRID[:lm_head|:layers], GRID in "
                    + ", ".join(GRIDS))
    ap.add_argument("--block", type=int, default=128, help="--fake-quant block size")
    args = ap.parse_args(argv)

    def model_file(p: Path) -> Path:
        return p / "model.onnx" if p.is_dir() else p

    ref = model_file(args.reference)
    windows = lm_eval.text_windows(args.text, args.tokenizer, args.window, args.windows, model_dir=ref.parent)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer or ref.parent))
    special = np.asarray(tok(args.token, add_special_tokens=False)["input_ids"], np.int64)
    targets = np.isin(windows[:, 1:], special)
    inputs = np.isin(windows[:, :-1], special)
    plain = ~targets & ~inputs
    ref_lp = log_probs(ref, ref, windows)
    ref_nll = -np.take_along_axis(ref_lp, windows[:, 1:, None], -1)[..., 0]
    print(f"{len(windows)} windows of {args.window}; token {args.token!r} = {special.tolist()}: "
          f"{int(targets.sum())} targets ({targets.mean():.1%}), {int(inputs.sum())} inputs\n")
    print(f"| model | perplexity | top-1 vs FP32 | mean KL to FP32 | NLL change at {args.token!r} targets | "
          f"perplexity without {args.token!r} positions |")
    print("|---|---|---|---|---|---|")
    print(f"| FP32 | {np.exp(ref_nll.mean()):.3f} | 1.000 | 0 | 0 | {np.exp(ref_nll[plain].mean()):.3f} |")
    with tempfile.TemporaryDirectory(prefix="bench-lm-gap-") as tmp:
        fakes = [fake_quant_folder(args.reference, s, args.block, Path(tmp))
                 for s in args.fake_quant.split(",") if s]
        for cand in [*args.candidates, *fakes]:
            lp = log_probs(model_file(cand), ref, windows)
            nll = -np.take_along_axis(lp, windows[:, 1:, None], -1)[..., 0]
            kl = (np.exp(ref_lp) * (ref_lp - lp)).sum(-1)
            top1 = (lp.argmax(-1) == ref_lp.argmax(-1)).mean()
            label = f"fake-quant {cand.name}" if cand in fakes else str(cand)
            print(f"| {label} | {np.exp(nll.mean()):.3f} | {top1:.4f} | {kl.mean():.4f} | "
                  f"{(nll - ref_nll)[targets].mean():+.3f} | {np.exp(nll[plain].mean()):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
