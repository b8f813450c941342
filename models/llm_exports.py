"""Llama-architecture test decoders and the three ways users export them to ONNX.

    tiny_llama_hf(DIR)                      random-weight LlamaForCausalLM + trained byte-level BPE tokenizer
    export_builder(DIR, OUT, "fp32")        onnxruntime-genai's model builder (genai folder: model.onnx, genai_config.json)
    export_optimum(DIR, OUT)                optimum's text-generation-with-past export (its own venv, see below)
    export_torch(DIR, OUT/model.onnx, dynamo=True|False)   torch.onnx.export with past_key_values

Every export keeps the same I/O convention as the builder and optimum: inputs ``input_ids``,
``attention_mask``, ``position_ids`` (not the builder's), ``past_key_values.N.key/value``
``[batch, kv_heads, past, head_size]``; outputs ``logits`` and ``present.N.key/value``.

optimum-onnx 0.1.0 pins ``transformers<4.58`` while the main venv has a newer one, so
``export_optimum`` runs in ``build/venv-optimum``, created on first use (``python -m venv`` +
``pip install torch==2.13.0 optimum-onnx==0.1.0 "transformers<4.58"``; a few minutes, then cached).

Every function writes into a temporary sibling and renames at the end: an interrupted export never
leaves a folder that later runs would take for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
OPTIMUM_VENV = REPO / "build" / "venv-optimum"
OPTIMUM_PINS = ("torch==2.13.0", "optimum-onnx==0.1.0", "transformers>=4.45,<4.58", "onnx", "onnxruntime")
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


@dataclass(frozen=True)
class LlamaDims:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    intermediate: int = 0  # 0: 8/3 * hidden rounded up to a multiple of 32 (SwiGLU's usual ratio)
    context: int = 256

    @property
    def ffn(self) -> int:
        return self.intermediate or -(-8 * self.hidden // 3 // 32) * 32


# ------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(vocab: int, texts: list[str]):
    """A byte-level BPE (GPT-2 style: any byte sequence encodes) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, out_dir: Path, context: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[1], eos_token=SPECIALS[2], pad_token=SPECIALS[0],
        model_max_length=context,
    )
    fast.save_pretrained(out_dir)
    # Clients other than transformers (onnxruntime-genai's tokenizer, older transformers in the
    # optimum venv) need a class they know: a byte-level BPE is GPT-2's tokenizer.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def training_texts() -> tuple[list[str], list[str]]:
    """(train, held-out) paragraphs of the stdlib docstrings (the split models/opt.py uses)."""
    from models.opt import split_text

    return split_text()


# ----------------------------------------------------------------------------------------- model
def llama_config(dims: LlamaDims):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=dims.vocab, hidden_size=dims.hidden, intermediate_size=dims.ffn,
        num_hidden_layers=dims.layers, num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads,
        max_position_embeddings=dims.context, rms_norm_eps=1e-5, rope_theta=10000.0,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )


def build_llama(dims: LlamaDims, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = llama_config(dims)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def save_hf(model, tok, out_dir: str | os.PathLike, meta: dict, extra_files: dict[str, str] | None = None) -> Path:
    """save_pretrained the model (safetensors, fp32) + tokenizer + a meta.json (+ ``extra_files``,
    name -> text), atomically."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(tmp)
        save_tokenizer(tok, tmp, model.config.max_position_embeddings)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tiny_llama_hf(out_dir, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                  kv_heads: int = 2, vocab: int = 512, intermediate: int = 0, context: int = 256) -> Path:
    """A random-weight Llama (GQA, RMSNorm, SwiGLU, RoPE) with a byte-level BPE tokenizer trained on
    the docstrings, saved with save_pretrained into ``out_dir``. Cached: an existing folder built
    with the same settings is reused."""
    dims = LlamaDims(hidden, layers, heads, kv_heads, vocab, intermediate, context)
    meta = {"kind": "random", "dims": asdict(dims), "seed": seed}
    out = Path(out_dir)
    if _cached(out, meta):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    train_p, _ = training_texts()
    tok = train_tokenizer(vocab, train_p)
    return save_hf(build_llama(dims, seed), tok, out, meta)


def _cached(out: Path, meta: dict) -> bool:
    try:
        return json.loads((out / "meta.json").read_text()) == meta
    except (OSError, ValueError):
        return False


def _replace(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# --------------------------------------------------------------------------------------- exports
def export_builder(hf_dir, out_dir, precision: str = "fp32", extra_options: dict | None = None,
                   *, python: str = sys.executable) -> Path:
    """``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION -e cpu``.

    ``extra_options``: the builder's ``--extra_options`` as a dict, e.g.
    ``{"algo_config": "k_quant_mixed", "block_size": 128}`` for ``-p int4``."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        cmd = [python, "-m", "onnxruntime_genai.models.builder", "-i", str(Path(hf_dir).resolve()),
               "-o", str(tmp / "model"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
        if extra_options:
            cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
        _run(cmd, cwd=tmp)
        _replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def optimum_python() -> Path:
    """The optimum venv's python, created on first use."""
    py = OPTIMUM_VENV / "bin" / "python"
    if (OPTIMUM_VENV / ".ready").is_file():
        return py
    shutil.rmtree(OPTIMUM_VENV, ignore_errors=True)
    OPTIMUM_VENV.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(OPTIMUM_VENV)])
    _run([str(py), "-m", "pip", "install", "-q",
          *OPTIMUM_PINS])
    (OPTIMUM_VENV / ".ready").write_text("\n".join(OPTIMUM_PINS) + "\n")
    return py


def export_optimum(hf_dir, out_dir) -> Path:
    """optimum's ``text-generation-with-past`` export: a folder ORTModelForCausalLM loads
    (model.onnx, config.json, tokenizer files)."""
    py = optimum_python()
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        _run([str(py), "-m", "optimum.exporters.onnx", "--model", str(Path(hf_dir).resolve()),
              "--task", "text-generation-with-past", "--no-post-process", str(tmp / "model")], cwd=tmp)
        _replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_torch(hf_dir, out_path, *, dynamo: bool = True, external_data: bool = True) -> Path:
    """torch.onnx.export of the HF model with a KV cache. A wrapper takes the past as flat tensors
    and builds the transformers cache inside, so both exporters see plain tensors in and out."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    cfg = model.config
    n_layers, kv, head = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    past_names = [f"past_key_values.{i}.{kv_}" for i in range(n_layers) for kv_ in ("key", "value")]
    present_names = [f"present.{i}.{kv_}" for i in range(n_layers) for kv_ in ("key", "value")]
    wrapper = _flat_past(model)
    batch, seq, past = 2, 3, 4
    g = torch.Generator().manual_seed(0)
    args = (
        torch.randint(3, cfg.vocab_size, (batch, seq), generator=g),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).repeat(batch, 1),
        *[torch.randn(batch, kv, past, head, generator=g) for _ in past_names],
    )
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        target = tmp / out.name
        with torch.no_grad():
            if dynamo:
                b, s, p, t = (torch.export.Dim(n) for n in ("batch", "sequence", "past", "total"))
                shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past_names))
                onnx_prog = torch.onnx.export(wrapper, args, dynamo=True, input_names=names,
                                              output_names=["logits", *present_names], dynamic_shapes=shapes,
                                              optimize=True)
                onnx_prog.save(str(target), external_data=external_data)
            else:
                axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                        "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
                        **{n: {0: "batch", 2: "past"} for n in past_names},
                        **{n: {0: "batch", 2: "total"} for n in present_names}}
                torch.onnx.export(wrapper, args, str(target), input_names=names,
                                  output_names=["logits", *present_names], dynamic_axes=axes, opset_version=17,
                                  dynamo=False)
                if external_data:
                    _to_external(target)
        out.parent.mkdir(parents=True, exist_ok=True)
        for f in tmp.iterdir():
            dest = out.parent / f.name
            if dest.exists():
                dest.unlink()
            f.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _to_external(path: Path) -> None:
    import onnx

    m = onnx.load(str(path))
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def _flat_past_class():
    import torch
    from transformers import DynamicCache

    class FlatPast(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2], strict=True)))
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatPast


def _flat_past(lm):
    return _flat_past_class()(lm)


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}):\n{tail}")
