"""A small OPT-architecture decoder LM, trained here on real English (the standard library's
docstrings), exported to ONNX with a ``logits`` output. No download: the text ships with Python.

    python -m models.opt --out build/opt            # trained model (a few minutes on 2 cores, cached)
    python -m models.opt --out build/opt-tiny --untrained   # tiny random model in seconds (for tests)

Tokens are bytes (vocabulary 256 + pad/bos/eos), so no tokenizer has to be trained or shipped and
perplexity is per byte. Everything is seeded: the same command gives the same weights.
``out_dir`` holds ``model.onnx``, ``train.txt`` / ``heldout.txt`` (disjoint paragraphs) and, for the
trained model, the torch checkpoint ``model.pt`` that later runs reuse.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models.text import _MODULES, docstrings  # noqa: E402

PAD, BOS, EOS = 256, 257, 258
VOCAB = 260  # 256 bytes + pad, bos, eos, one spare (keeps the embedding rows even)
INPUT_NAMES = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class Dims:
    hidden: int
    layers: int
    heads: int
    ffn: int
    context: int


TINY = Dims(hidden=64, layers=2, heads=4, ffn=256, context=64)
SMALL = Dims(hidden=192, layers=4, heads=4, ffn=768, context=128)


@dataclass(frozen=True)
class Training:
    steps: int = 600
    batch: int = 24
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0


# ---------------------------------------------------------------------------------------- text
@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Prose paragraphs of stdlib docstrings (modules, classes, functions, methods), deduplicated,
    in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in docstrings(_MODULES, methods=True):
        for para in doc.split("\n\n"):
            text = " ".join(para.split())
            if len(text.split()) >= 5 and text.isascii() and text not in seen:
                seen.add(text)
                out.append(text)
    return tuple(out)


def split_text() -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs: about 8% held out, by a hash of the paragraph."""
    train, held = [], []
    for p in paragraphs():
        (held if hashlib.sha256(p.encode()).digest()[0] < 20 else train).append(p)
    return train, held


def encode(paragraphs_: list[str]) -> np.ndarray:
    """One long int64 stream: BOS, bytes, EOS per paragraph."""
    parts = []
    for p in paragraphs_:
        parts += [[BOS], list(p.encode("ascii")), [EOS]]
    return np.fromiter((t for part in parts for t in part), dtype=np.int64)


def windows(stream: np.ndarray, context: int) -> np.ndarray:
    """Non-overlapping ``[n, context]`` windows of a token stream (the tail is dropped)."""
    n = len(stream) // context
    return stream[: n * context].reshape(n, context)


# ---------------------------------------------------------------------------------------- model
def build(dims: Dims, seed: int):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=dims.hidden, num_hidden_layers=dims.layers, ffn_dim=dims.ffn,
        num_attention_heads=dims.heads, max_position_embeddings=dims.context, word_embed_proj_dim=dims.hidden,
        do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, enable_bias=True,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    return OPTForCausalLM(cfg).eval()


def train(model, data: np.ndarray, cfg: Training, *, log=print):
    """AdamW with warm-up and cosine decay over random windows of ``data`` ([n, context])."""
    import torch

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * min(s / cfg.steps, 1.0)))
    )
    model.train()
    started = time.perf_counter()
    for step in range(cfg.steps):
        batch = torch.from_numpy(data[rng.integers(0, len(data), cfg.batch)])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f} s")
    return model.eval()


def _export_onnx(model, path: Path, context: int) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.randint(0, 256, (2, min(16, context)), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    dyn = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad():
        torch.onnx.export(
            Logits(model), (ids, mask), str(tmp), input_names=list(INPUT_NAMES), output_names=["logits"],
            dynamic_axes={**dyn, "logits": {0: "batch", 1: "sequence"}}, opset_version=17, dynamo=False,
        )
    shutil.move(tmp, path)


def export(out_dir: str | os.PathLike, *, trained: bool = False, log=print) -> Path:
    """Write ``out_dir/model.onnx`` (logits) and the text splits; returns the model path.

    ``trained=False``: a tiny randomly initialised OPT (seed 0), in seconds: for tests.
    ``trained=True``: the small OPT trained on the training paragraphs; the checkpoint is cached in
    ``out_dir/model.pt`` and reused when its settings match.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_p, held_p = split_text()
    (out / "train.txt").write_text("\n".join(train_p) + "\n")
    (out / "heldout.txt").write_text("\n".join(held_p) + "\n")
    dims = SMALL if trained else TINY
    model = build(dims, seed=0)
    if trained:
        cfg = Training()
        ckpt = out / "model.pt"
        meta = {"dims": asdict(dims), "training": asdict(cfg)}
        cached = torch.load(ckpt, weights_only=False) if ckpt.is_file() else None
        if cached is not None and cached.get("meta") == meta:
            model.load_state_dict(cached["state"])
            log(f"reusing {ckpt}")
        else:
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            train(model, windows(encode(train_p), dims.context), cfg, log=log)
            torch.save({"meta": meta, "state": model.state_dict()}, ckpt)
    path = out / "model.onnx"
    _export_onnx(model, path, dims.context)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/opt"))
    ap.add_argument("--untrained", action="store_true", help="tiny random model (seconds; for tests)")
    args = ap.parse_args()
    started = time.perf_counter()
    path = export(args.out, trained=not args.untrained)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
