"""Causal-LM evaluation: perplexity over windows of a text file, and teacher-forced next-token top-1
agreement of a candidate with the float model.

The text is tokenised once and cut into non-overlapping windows of ``length`` tokens; every window
runs as one prefill (input_ids, an all-ones attention_mask, position_ids 0..T-1 where the model asks
for them, and empty past_key_values of the declared dtype and head size for KV-cache models).
Perplexity is ``exp`` of the mean negative log-likelihood of tokens 1..T-1 given the ones before.
Logits with NaN or Inf make a metric NaN and are counted, never scored as agreement.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxfgq.errors import OnnxfgqError

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bfloat16)": np.float32}


class LMEvalError(OnnxfgqError):
    """Text or a model that causal-LM evaluation cannot use."""


def text_windows(text_file: Path, tokenizer: Path | None, length: int, limit: int = 0,
                 model_dir: Path | None = None) -> np.ndarray:
    """``[n, length]`` int64 token ids: the whole file tokenised, cut into non-overlapping windows.
    The tokenizer is found as for ``text:`` calibration: ``tokenizer``, else ``model_dir``, else the
    text file's folder."""
    from onnxfgq.calibration.sources import find_tokenizer

    text_file = Path(text_file)
    if not text_file.is_file():
        raise LMEvalError(f"{text_file}: no such text file")
    tok_dir = find_tokenizer(Path(tokenizer) if tokenizer else None, model_dir, text_file)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError, KeyError, ImportError) as exc:  # what from_pretrained raises for a bad folder
        raise LMEvalError(f"{tok_dir}: cannot load a tokenizer ({type(exc).__name__}); pass --tokenizer DIR") from None
    tok.model_max_length = 1 << 62  # the whole file at once; windows keep each run within the context
    ids = np.asarray(tok(text_file.read_text(), add_special_tokens=False)["input_ids"], np.int64)
    n = len(ids) // length
    if n == 0:
        raise LMEvalError(f"{text_file}: {len(ids)} tokens, fewer than one window of {length}")
    windows = ids[: n * length].reshape(n, length)
    return windows[:limit] if limit else windows


@dataclass(frozen=True)
class DecoderInputs:
    """How to build a prefill feed for a decoder session from token ids."""

    ids: tuple[str, np.dtype]
    mask: tuple[str, np.dtype] | None
    positions: tuple[str, np.dtype] | None
    past: tuple[tuple[str, np.dtype, tuple], ...]  # name, dtype, shape with None for batch and past length
    logits: str

    def feed(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        b, t = ids.shape
        out = {self.ids[0]: ids.astype(self.ids[1])}
        if self.mask:
            out[self.mask[0]] = np.ones((b, t), self.mask[1])
        if self.positions:
            out[self.positions[0]] = np.broadcast_to(np.arange(t), (b, t)).astype(self.positions[1])
        for name, dtype, shape in self.past:
            out[name] = np.zeros((b, shape[1], 0, shape[3]), dtype)
        return out


def decoder_inputs(session, model_path: Path | None = None, fallback: Path | None = None) -> DecoderInputs:
    """Read the inputs a decoder session declares; past tensors' head counts and sizes come from the
    graph, else from genai_config.json / config.json beside the model (or beside ``fallback``, the
    reference model, whose architecture a candidate shares)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]

    def pick(*names):
        for n in names:
            if n in inputs:
                return n, _dtype(inputs[n].type)
        return None

    ids = pick("input_ids")
    if ids is None:
        ints = [n for n, i in inputs.items() if "int" in i.type]
        if not ints:
            raise LMEvalError("the model has no integer token-id input (input_ids)")
        ids = (ints[0], _dtype(inputs[ints[0]].type))
    mask, positions = pick("attention_mask"), pick("position_ids")
    used = {ids[0]} | {x[0] for x in (mask, positions) if x}
    past = []
    for name, info in inputs.items():
        if name in used:
            continue
        shape = list(info.shape)
        if len(shape) != 4 or "past" not in name:
            raise LMEvalError(f"input {name!r} {shape}: not a token, mask, position or past input; "
                              "causal-LM evaluation cannot feed it")
        for axis, what in ((1, "kv_heads"), (3, "head_size")):
            if not isinstance(shape[axis], int):
                shape[axis] = _from_config([p for p in (model_path, fallback) if p], what, name)
        past.append((name, _dtype(info.type), (None, shape[1], None, shape[3])))
    logits = "logits" if "logits" in outputs else outputs[0]
    return DecoderInputs(ids, mask, positions, tuple(past), logits)


def _dtype(ort_type: str) -> np.dtype:
    if ort_type not in _ORT_DTYPES:
        raise LMEvalError(f"input type {ort_type} is not supported by causal-LM evaluation")
    return np.dtype(_ORT_DTYPES[ort_type])


def _from_config(model_paths: list[Path], what: str, name: str) -> int:
    """``kv_heads`` or ``head_size`` from genai_config.json / config.json beside the first model that has it."""
    from onnxfgq.calibration.feeds import model_config

    for path in model_paths:
        value = model_config(Path(path).parent).get(what)
        if value:
            return value
    raise LMEvalError(f"input {name!r}: {what} is symbolic and no genai_config.json / config.json gives it")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class LMStats:
    """Streaming sums over windows for one model (and its agreement with a reference)."""

    nll: float = 0.0
    predicted: int = 0  # tokens scored for perplexity
    agree: int = 0
    compared: int = 0  # positions compared for agreement
    non_finite: int = 0  # windows whose logits had NaN/Inf
    windows: int = 0

    def add(self, logits: np.ndarray, ids: np.ndarray) -> bool:
        """Score one batch; False (and counted) when the logits are not all finite."""
        self.windows += len(ids)
        if not np.isfinite(logits).all():
            self.non_finite += len(ids)
            return False
        lp = _log_softmax(logits[:, :-1])
        target = ids[:, 1:]
        self.nll -= float(np.take_along_axis(lp, target[..., None], -1).sum())
        self.predicted += target.size
        return True

    @property
    def perplexity(self) -> float:
        if self.non_finite or not self.predicted:
            return float("nan")
        return math.exp(self.nll / self.predicted)


@dataclass
class LMResult:
    windows: int
    length: int
    perplexity: dict[str, float] = field(default_factory=dict)  # "reference" / "candidate"
    top1_agreement: float | None = None
    non_finite: dict[str, int] = field(default_factory=dict)  # windows with NaN/Inf logits, per model

    def metrics(self) -> dict[str, float]:
        m = {f"perplexity_{k}": v for k, v in self.perplexity.items()}
        if self.top1_agreement is not None:
            m["next_token_top1"] = self.top1_agreement
        m.update({f"non_finite_windows_{k}": float(v) for k, v in self.non_finite.items() if v})
        return m


def _session(path: Path, custom_ops: bool):
    from onnxfgq.evaluate import make_session

    return make_session(Path(path), custom_ops=custom_ops)


def _no_progress(items: Iterable, total: int, label: str) -> Iterable:
    del total, label
    return items


def evaluate(models: dict[str, Path], windows: np.ndarray, *, batch_size: int = 4, custom_ops: bool = False,
             progress: Callable = _no_progress) -> LMResult:
    """Perplexity of each model in ``models`` (label -> path) on ``windows``; with two models, the
    second's teacher-forced top-1 agreement with the first (the reference)."""
    sessions = {k: _session(p, custom_ops and i > 0) for i, (k, p) in enumerate(models.items())}
    first = next(iter(models.values()))
    feeds = {k: decoder_inputs(s, models[k], first) for k, s in sessions.items()}
    stats = {k: LMStats() for k in sessions}
    labels = list(sessions)
    agree = compared = 0
    bad_pair = False
    batches = range(0, len(windows), batch_size)
    for start in progress(batches, len(batches), "perplexity"):
        ids = windows[start:start + batch_size]
        logits = {}
        for k, sess in sessions.items():
            logits[k] = sess.run([feeds[k].logits], feeds[k].feed(ids))[0]
            if logits[k].shape[:2] != ids.shape:
                raise LMEvalError(f"{models[k]}: logits {list(logits[k].shape)} do not have one row per token "
                                  f"of the window {list(ids.shape)}")
        finite = [stats[k].add(logits[k], ids) for k in labels]
        if len(labels) == 2:
            if all(finite):
                agree += int((logits[labels[0]].argmax(-1) == logits[labels[1]].argmax(-1)).sum())
                compared += ids.size
            else:
                bad_pair = True
    result = LMResult(len(windows), int(windows.shape[1]),
                      perplexity={k: s.perplexity for k, s in stats.items()},
                      non_finite={k: s.non_finite for k, s in stats.items()})
    if len(labels) == 2:
        result.top1_agreement = float("nan") if bad_pair or not compared else agree / compared
    return result


def parse_spec(spec: str) -> Path:
    """``text:FILE`` -> FILE (the only source causal-LM evaluation reads)."""
    if not spec.startswith("text:"):
        raise LMEvalError(f"--perplexity: expected text:FILE, got {spec!r}")
    return Path(spec[5:])


__all__ = ["DecoderInputs", "LMEvalError", "LMResult", "decoder_inputs", "evaluate", "parse_spec", "text_windows"]
