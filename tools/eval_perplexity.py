"""Perplexity of the small OPT-architecture LM (``models/opt.py``) under each weight quantizer:
the seeds' Table 1 (FP32 / int4 per-tensor / per-channel / g128 RTN / GPTQ / AWQ / adaptive) on a
model we can train and run here.

    python tools/eval_perplexity.py --model-dir build/opt --out build/opt/perplexity.md

Held-out text is ``heldout.txt`` (paragraphs never trained on); calibration is 128 windows of
``train.txt``. Perplexity is per byte (the model's tokens are bytes), over non-overlapping windows of
the model's context, every position after the first predicting the next byte.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Row:
    label: str
    weights: dict  # WeightConfig fields; None = the float model


def default_rows(calib: str) -> list[Row]:
    c = {"calibration": calib}
    return [
        Row("FP32", None),
        Row("int4 per-tensor RTN", {"granularity": "tensor", "format": "qdq"}),
        Row("int4 per-channel RTN", {"granularity": "channel"}),
        Row("int4 g128 RTN", {"block_size": 128}),
        Row("int4 g32 RTN", {"block_size": 32}),
        Row("int4 per-channel GPTQ", {"granularity": "channel", "algorithm": "gptq", **c}),
        Row("int4 g128 GPTQ", {"block_size": 128, "algorithm": "gptq", **c}),
        Row("int4 g128 GPTQ+clip", {"block_size": 128, "algorithm": "gptq+clip", **c}),
        Row("int4 g128 AWQ", {"block_size": 128, "algorithm": "awq", **c}),
        Row("int4 g128 AWQ+GPTQ", {"block_size": 128, "algorithm": "awq+gptq", **c}),
        Row("int4 adaptive RTN (max-error 0.01)", {"granularity": "adaptive", "max_error": 0.01, **c}),
        Row("int4 adaptive GPTQ (max-error 0.01)", {"granularity": "adaptive", "max_error": 0.01,
                                                    "algorithm": "gptq", **c}),
        Row("mixed 4/8 GPTQ g128, target 6 bits", {"block_size": 128, "target_bits": 6.0, "algorithm": "gptq", **c}),
    ]


def write_calibration(model_dir: Path, context: int, n: int = 128, per_file: int = 16) -> Path:
    """``n`` training windows as .npz feeds (``input_ids``, ``attention_mask``) in ``model_dir/calib``."""
    from models.opt import encode, windows

    folder = model_dir / "calib"
    folder.mkdir(exist_ok=True)
    text = [p for p in (model_dir / "train.txt").read_text().splitlines() if p]
    data = windows(encode(text), context)
    picks = data[np.random.default_rng(0).choice(len(data), n, replace=False)]
    for i in range(0, n, per_file):
        ids = picks[i:i + per_file]
        np.savez(folder / f"{i // per_file:03d}.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    return folder


def heldout_windows(model_dir: Path, context: int, limit: int) -> np.ndarray:
    from models.opt import encode, windows

    text = [p for p in (model_dir / "heldout.txt").read_text().splitlines() if p]
    data = windows(encode(text), context)
    return data[:limit] if limit else data


def perplexity(path: Path, data: np.ndarray, batch: int = 16) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    for i in range(0, len(data), batch):
        ids = data[i:i + batch]
        logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0].astype(np.float64)
        logits = logits[:, :-1]
        target = ids[:, 1:]
        mx = logits.max(-1, keepdims=True)
        logz = np.log(np.exp(logits - mx).sum(-1)) + mx[..., 0]
        picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
        nll += float((logz - picked).sum())
        count += target.size
    return float(np.exp(nll / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=ROOT / "build" / "opt")
    ap.add_argument("--windows", type=int, default=0, help="held-out windows to score (0: all)")
    ap.add_argument("--only", action="append", default=[], help="run only rows whose label contains this")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--context", type=int, default=0, help="window length (default: the trained model's)")
    args = ap.parse_args()

    from models.opt import SMALL, export
    from onnxfgq.api import quantize
    from onnxfgq.config import QuantizeConfig, WeightConfig, _from_plain
    from onnxfgq.graph import io

    model = args.model_dir / "model.onnx"
    if not model.is_file():
        export(args.model_dir, trained=True)
    context = args.context or SMALL.context
    calib = write_calibration(args.model_dir, context)
    data = heldout_windows(args.model_dir, context, args.windows)
    rows = [r for r in default_rows(str(calib)) if not args.only or any(o in r.label for o in args.only)]
    lines = ["| weights | bits/weight | perplexity (per byte) | quantize s |", "|---|---|---|---|"]
    print(f"{len(data)} held-out windows of {context} bytes", flush=True)
    for row in rows:
        if row.weights is None:
            ppl, bpw, secs = perplexity(model, data), 32.0, 0.0
        else:
            cfg = QuantizeConfig(weights=_from_plain(WeightConfig, row.weights))
            started = time.perf_counter()
            try:
                result = quantize(model, cfg)
            except ValueError as exc:  # e.g. a bit budget this model's shapes cannot meet
                print(f"| {row.label} | n/a: {exc} |", flush=True)
                continue
            secs = time.perf_counter() - started
            out = args.model_dir / "q.onnx"
            io.save(result.model, out)
            ppl, bpw = perplexity(out, data), result.report.bits_per_weight() or float("nan")
        line = f"| {row.label} | {bpw:.2f} | {ppl:.3f} | {secs:.1f} |"
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
