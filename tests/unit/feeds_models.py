"""Tiny decoders for the feed tests, exported the ways users export them (built in seconds, cached
per test session): onnxruntime-genai's builder (GroupQueryAttention, a symbolic head size that only
genai_config.json knows), a torch KV-cache export with optimum's I/O names and dims, and a GPT-2
whose token ids reach the embedding through a Reshape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
VOCAB = 320
CORPUS = [
    "Quantization maps floating point weights to a few integer levels.",
    "A group of one hundred and twenty eight weights shares one scale and one zero point.",
    "The calibration data flows through the model once; only statistics stay in memory.",
    "Every symbolic dimension of a random input is chosen from a flag or a documented default.",
    "Decoders with a key value cache are calibrated from an empty cache on the prompt pass.",
] * 8


def tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (pad/bos/eos = ids 0/1/2) saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS).save_pretrained(folder)


def llama_hf(folder: Path) -> Path:
    """A random-weight Llama (GQA: 4 heads, 2 KV heads, head size 16) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tokenizer(folder)
    return folder


def builder_export(hf: Path, out: Path) -> Path:
    """``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``: model.onnx + genai_config.json."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
           "-p", "fp32", "-e", "cpu", "-c", str(out.parent / "builder-cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / "model.onnx"


def optimum_like_export(hf: Path, out: Path) -> Path:
    """torch.onnx.export (legacy) with optimum's text-generation-with-past I/O: input_ids,
    attention_mask [batch_size, past_sequence_length + sequence_length], position_ids,
    past_key_values.N.key/value [batch_size, 2, past_sequence_length, 16]; config.json beside."""
    import shutil

    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    lm = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    layers = lm.config.num_hidden_layers

    class FlatPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
            res = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            return (res.logits, *[t for layer in res.past_key_values.layers for t in (layer.keys, layer.values)])

    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    args = (torch.randint(3, VOCAB, (2, 3)), torch.ones(2, 7, dtype=torch.int64), torch.arange(4, 7).repeat(2, 1),
            *[torch.randn(2, 2, 4, 16) for _ in past])
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"},
            **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past},
            **{n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in present}}
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(FlatPast(), args, str(out / "model.onnx"), input_names=["input_ids", "attention_mask",
                          "position_ids", *past], output_names=["logits", *present], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf / name, out / name)
    return out / "model.onnx"


def gpt2_export(out: Path, vocab: int = 300) -> Path:
    """A tiny GPT-2 (no cache) whose input_ids reach the token embedding through a Reshape."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=2, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            mask = torch.ones_like(input_ids)  # without one, the mask code uses ops the exporter lacks
            return self.m(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(Logits(), (torch.randint(0, vocab, (2, 5)),), str(path), input_names=["input_ids"],
                          output_names=["logits"], dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}},
                          opset_version=17, dynamo=False)
    return path
