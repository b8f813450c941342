"""The test LLM: a small Llama (GQA, RMSNorm, SwiGLU, RoPE) with a byte-level BPE tokenizer, both
trained here on the standard library's docstrings (no download), saved as a Hugging Face folder.

    python -m models.llama --out build/llama          # trained test LLM (about a minute on 2 cores, cached)
    python -m models.llama --out build/llama-125m --large   # random-weight 120M+ config, for speed benchmarks

The trained folder also holds ``train.txt`` / ``heldout.txt`` (the disjoint paragraph split of
models/opt.py, one paragraph per line) and ``metrics.json``: held-out perplexity per token of the model
and of a unigram model fitted to the training tokens, so "it learned something" is a number, not a
claim. The model is trained on exactly what ``onnxfgq eval --perplexity text:heldout.txt`` scores:
the file's text tokenised as it is (newlines included, no special tokens), cut into windows of the
context length. (Until stop 19 it trained on BOS/EOS-framed paragraphs, so every newline target of
the evaluation file was a token it had never predicted, and those 2% of the targets decided
quantized perplexity differences; see docs/BENCHMARKS.md.) Everything is seeded; the checkpoint is
reused when the settings match (``meta.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from models.llm_exports import (
    LlamaDims,
    _cached,
    build_llama,
    save_hf,
    tiny_llama_hf,
    train_tokenizer,
    training_texts,
)
from models.opt import Training, train

# intermediate 384 (3x): the builder's int4 algo_config=rtn crashes when ceil(K / block) is odd (352 / 32).
SMALL = LlamaDims(hidden=128, layers=4, heads=4, kv_heads=2, vocab=1024, intermediate=384, context=128)
TRAINING = Training(steps=400, batch=16, lr=3e-3, warmup=40, seed=0)
# >= 100M parameters (123M): only for speed; decode time is dominated by the weights, not training.
LARGE = LlamaDims(hidden=1024, layers=8, heads=16, kv_heads=4, vocab=16384, intermediate=2816, context=512)


def as_text(paragraphs: list[str]) -> str:
    """The text file's content: one paragraph per line."""
    return "\n".join(paragraphs) + "\n"


def encode(tok, text: str) -> np.ndarray:
    """One int64 stream: the text tokenised as ``onnxfgq eval`` tokenises a text file."""
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def windows(stream: np.ndarray, context: int) -> np.ndarray:
    n = len(stream) // context
    return stream[: n * context].reshape(n, context)


def unigram_perplexity(train_ids: np.ndarray, held_windows: np.ndarray, vocab: int) -> float:
    """Perplexity of add-one-smoothed token frequencies on the predicted positions (all but the
    first of each window, the ones the LM is scored on)."""
    counts = np.bincount(train_ids, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[held_windows[:, 1:]].mean()))


def model_perplexity(model, held_windows: np.ndarray) -> float:
    import torch

    with torch.no_grad():
        losses = [model(input_ids=torch.from_numpy(w[None]), labels=torch.from_numpy(w[None])).loss.item()
                  for w in held_windows]
    return float(np.exp(np.mean(losses)))


def trained_llama_hf(out_dir, *, dims: LlamaDims = SMALL, cfg: Training = TRAINING, log=print) -> Path:
    """Train (or reuse) the test LLM; returns its Hugging Face folder."""
    import torch

    out = Path(out_dir)
    meta = {"kind": "trained", "format": "text-lines", "dims": asdict(dims), "training": asdict(cfg)}
    if _cached(out, meta):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    train_p, held_p = training_texts()
    train_text, held_text = as_text(train_p), as_text(held_p)
    tok = train_tokenizer(dims.vocab, [p + "\n" for p in train_p])
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    held = windows(held_ids, dims.context)
    model = build_llama(dims, cfg.seed)
    # One thread: on a shared 2-core machine two threads spin against other jobs (5-15x slower
    # per step measured here); one gives a steady ~0.2 s per step.
    torch.set_num_threads(1)
    started = time.perf_counter()
    train(model, windows(train_ids, dims.context), cfg, log=log)
    seconds = time.perf_counter() - started
    metrics = {
        "heldout_tokens": int(held[:, 1:].size),
        "perplexity": model_perplexity(model, held),
        "unigram_perplexity": unigram_perplexity(train_ids, held, dims.vocab),
        "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    log(f"held-out perplexity {metrics['perplexity']:.2f} (unigram {metrics['unigram_perplexity']:.2f})")
    return save_hf(model, tok, out, meta, {
        "train.txt": train_text,
        "heldout.txt": held_text,
        "metrics.json": json.dumps(metrics, indent=2) + "\n",
    })


def large_llama_hf(out_dir) -> Path:
    """The random-weight 123M-parameter configuration (speed benchmarks only)."""
    d = LARGE
    return tiny_llama_hf(out_dir, hidden=d.hidden, layers=d.layers, heads=d.heads, kv_heads=d.kv_heads,
                         vocab=d.vocab, intermediate=d.intermediate, context=d.context)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/llama"))
    ap.add_argument("--large", action="store_true", help="random-weight 123M config (speed only)")
    args = ap.parse_args()
    started = time.perf_counter()
    path = large_llama_hf(args.out) if args.large else trained_llama_hf(args.out)
    print(f"{path} ready in {time.perf_counter() - started:.0f} s")
    if (path / "metrics.json").is_file():
        print((path / "metrics.json").read_text())


if __name__ == "__main__":
    main()
