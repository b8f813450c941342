"""Transformer exports made here: random-weight tiny configs of BERT, GPT-2, T5 encoder, ViT and
Whisper encoder, exported with both torch exporters (``dynamo=True`` and the legacy TorchScript one).

Shapes are fixed (batch 2), so random feeds need no ``--dim``. Exports are cached under
build/test-models/corpus/ (written to a temporary name, then renamed: a killed run leaves no half file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "test-models" / "corpus"
ARCHS = ("bert", "gpt2", "t5", "vit", "whisper")
EXPORTERS = ("legacy", "dynamo")
VOCAB = 120
BATCH, SEQ = 2, 12


def _model(arch: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    small = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    if arch == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **small))
        names, args = ["input_ids", "attention_mask"], (
            torch.randint(0, VOCAB, (BATCH, SEQ)), torch.ones(BATCH, SEQ, dtype=torch.int64))
    elif arch == "gpt2":
        model = tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                           use_cache=False, attn_implementation="eager"))
        names, args = ["input_ids", "attention_mask"], (
            torch.randint(0, VOCAB, (BATCH, SEQ)), torch.ones(BATCH, SEQ, dtype=torch.int64))
    elif arch == "t5":
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2,
                                              num_heads=2))
        names, args = ["input_ids"], (torch.randint(0, VOCAB, (BATCH, SEQ)),)
    elif arch == "vit":
        model = tf.ViTModel(tf.ViTConfig(image_size=32, patch_size=8, **small))
        names, args = ["pixel_values"], (torch.randn(BATCH, 3, 32, 32),)
    elif arch == "whisper":
        cfg = tf.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                               num_mel_bins=16, max_source_positions=32, vocab_size=VOCAB, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        model = tf.WhisperModel(cfg).get_encoder()
        names, args = ["input_features"], (torch.randn(BATCH, 16, 64),)
    else:
        raise ValueError(arch)
    # Default inits (std 0.02) leave the residual stream to the embeddings: every variant would agree
    # with FP32 at cosine 1.0000 and the comparison would test nothing. Unit-gain weights make every
    # matrix matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.normal_(0.0, 1.0 / float(np.sqrt(min(p.shape))))
    return model.eval(), names, args


class _FirstOutput:
    """Wraps a transformers model so the export has one plain tensor output (the hidden states)."""

    def __new__(cls, model, names):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, *xs):
                return self.model(**dict(zip(names, xs)), return_dict=False)[0]

        return Wrapper().eval()


def export(arch: str, exporter: str) -> Path:
    """The cached ONNX file of ``arch`` exported with ``exporter`` ('legacy' or 'dynamo')."""
    import torch

    out = CACHE / f"{arch}-{exporter}.onnx"
    if out.is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    model, names, args = _model(arch)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.onnx")
    try:
        with torch.no_grad():
            if exporter == "dynamo":
                prog = torch.onnx.export(_FirstOutput(model, names), args, dynamo=True, input_names=names,
                                         output_names=["hidden"], optimize=True)
                prog.save(str(tmp))
            else:
                torch.onnx.export(_FirstOutput(model, names), args, str(tmp), input_names=names, output_names=["hidden"],
                                  opset_version=17, dynamo=False)
        import onnx

        onnx.save(onnx.load(str(tmp)), str(tmp))  # weights inline, whatever the exporter wrote
        os.replace(tmp, out)
    finally:
        for leftover in tmp.parent.glob(tmp.name + "*"):
            leftover.unlink()
    return out


def feed(path: Path, seed: int = 1) -> dict[str, np.ndarray]:
    """Non-constant inputs: random token ids (and a mask with padding), random images and spectrograms."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    out = {}
    for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs():
        shape = [d if isinstance(d, int) else BATCH for d in i.shape]
        if i.name == "attention_mask":
            mask = np.ones(shape, np.int64)
            mask[1, -3:] = 0
            out[i.name] = mask
        elif "int" in i.type:
            out[i.name] = rng.integers(0, VOCAB, shape).astype(np.int64)
        else:
            out[i.name] = rng.standard_normal(shape).astype(np.float32)
    return out
