"""The clients LLM users run, driven the way they drive them: plain onnxruntime with a KV cache
(prefill, then one token at a time with the past fed back) and onnxruntime-genai's generator.

Written here on purpose, independent of onnxfgq.lm_eval: the tests check onnxfgq's outputs with
code that shares nothing with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

# Held-out windows of WINDOW tokens: a PREFILL-token prefill, then token by token through the cache.
WINDOW, PREFILL, N_WINDOWS = 48, 16, 6
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class KVSession:
    """An onnxruntime session over a decoder with past_key_values.* inputs and present.* outputs."""

    def __init__(self, path: Path, *, custom_ops: bool = False, mem_reuse: bool = True):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.enable_mem_reuse = mem_reuse
        if custom_ops:
            from onnxfgq import ops

            ops.register(so)
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ins = self.sess.get_inputs()
        self.inputs = {i.name for i in ins}
        self.past = [(i.name, i.shape[1], i.shape[3] if isinstance(i.shape[3], int) else _head_size(Path(path)),
                      _NP[i.type]) for i in ins if i.name.startswith("past_key")]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def step(self, ids: np.ndarray, past: dict, start: int) -> tuple[np.ndarray, dict]:
        """Run ``ids`` [batch, T] after ``start`` cached positions; returns (logits, new past)."""
        b, t = ids.shape
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, start + t), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.tile(np.arange(start, start + t, dtype=np.int64), (b, 1))
        for name, heads, size, dtype in self.past:
            feed[name] = past.get(name, np.zeros((b, heads, 0, size), dtype))
        outs = dict(zip(self.outputs, self.sess.run(None, feed), strict=True))
        new_past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        return outs["logits"].astype(np.float32), new_past

    def teacher_forced(self, window: np.ndarray, prefill: int) -> np.ndarray:
        """Logits [T, vocab] for one window: a prefill of ``prefill`` tokens, then the rest one token
        at a time through the cache (both paths a client uses)."""
        logits, past = self.step(window[None, :prefill], {}, 0)
        rows = [logits[0]]
        for pos in range(prefill, len(window)):
            step_logits, past = self.step(window[None, pos : pos + 1], past, pos)
            rows.append(step_logits[0])
        return np.concatenate(rows, 0)

    def greedy(self, prompt: np.ndarray, n: int) -> list[int]:
        logits, past = self.step(prompt[None], {}, 0)
        out, pos = [], len(prompt)
        for _ in range(n):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            logits, past = self.step(np.array([[tok]]), past, pos)
            pos += 1
        return out


def _head_size(model: Path) -> int:
    """The builder declares the head size symbolically ('kv_cache_dim'); its folder's config says it."""
    genai = model.parent / "genai_config.json"
    if genai.is_file():
        return int(json.loads(genai.read_text())["model"]["decoder"]["head_size"])
    cfg = json.loads((model.parent / "config.json").read_text())
    return cfg["hidden_size"] // cfg["num_attention_heads"]


def agreement(reference: KVSession, candidate: KVSession, windows: np.ndarray, prefill: int) -> float:
    """Teacher-forced next-token top-1 agreement over all positions of ``windows``; NaN if the
    candidate's logits are not finite (never counted as agreement)."""
    same = total = 0
    for w in windows:
        ref = reference.teacher_forced(w, prefill)
        got = candidate.teacher_forced(w, prefill)
        if not np.isfinite(got).all():
            return float("nan")
        same += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += len(w)
    return same / total


def genai_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy decode ``n`` tokens with onnxruntime-genai's generator from the folder as it is."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    return list(gen.get_sequence(0))[len(prompt):]


def genai_tokenize(folder: Path, text: str) -> list[int]:
    import onnxruntime_genai as og

    return list(og.Tokenizer(og.Model(str(folder))).encode(text))
