"""What a model asks for and how every feed fills it: input roles, symbolic dims, decoder inputs.

Calibration and evaluation use the same readers (``sources.open_source``), and every reader builds
its feeds through :class:`FeedPlan`, so a model sees one consistent convention whatever the data:

- **Roles** come from the graph and the input names: token ids (integer inputs that reach a Gather,
  through Reshape/Cast/Unsqueeze/...: the table's rows are the valid range), attention masks,
  position ids, token type ids, and KV-cache inputs (``past_key_values.N.key``, ``past.*``).
- **Symbolic dims** are resolved once per model, each with the reason it has its value:
  ``--dim NAME=INT`` first; axis 0 of the inputs is the batch (the reader's batch size); the
  token inputs' axis 1 is the sequence (default 16); the KV cache's axis -2 is the past length
  (default 0: an empty cache); the attention mask of a KV-cache model spans past + sequence;
  KV heads and head size come from ``genai_config.json`` / ``config.json`` beside the model;
  the height and width of an image input (rank 4, float) default to 224. Names that look like a
  batch, a sequence or a past length get those values, and so does axis 1 of a float input
  ``[batch, ?, features]`` (embeddings, encoder states). Any other dim is refused with one line that
  asks for ``--dim NAME=INT`` (silently using 1 calibrated a text detector on 1x1 images).
- **Decoder inputs** a data source does not provide are filled consistently: attention mask of ones
  over past + sequence, position ids ``past .. past+T-1`` (from the mask when there is padding),
  token type ids 0, past tensors of the declared dtype (empty with the default past length 0).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from onnxfgq.errors import OnnxfgqError

DEFAULT_SEQUENCE = 16  # tokens per random sample
DEFAULT_PAST = 0  # KV-cache length of every feed: calibrate the prompt pass from an empty cache
DEFAULT_SPATIAL = 224  # height and width of image inputs with symbolic sizes

# Ops an index tensor passes through unchanged in value on its way to a Gather.
INDEX_PASSTHROUGH = frozenset({"Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand",
                               "Transpose", "Slice", "Tile"})
GATHER_OPS = frozenset({"Gather", "GatherBlockQuantized"})


class DataSourceError(OnnxfgqError):
    """A data source that cannot be opened or does not fit the model."""


class Role(str, Enum):
    TOKENS = "tokens"  # integer ids into an embedding table
    MASK = "mask"
    POSITIONS = "positions"
    TYPES = "token types"
    PAST = "past"  # KV cache
    VALUES = "values"  # anything else (floats, other integers)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    index_bound: int | None = None  # for integer inputs used as Gather indices: the table's rows
    role: Role = Role.VALUES


@dataclass(frozen=True)
class FeedOptions:
    """Everything beside the data itself that decides a feed: ``--dim``, ``--tokenizer``, the model's folder."""

    dims: Mapping[str, int] = field(default_factory=dict)
    tokenizer: Path | None = None
    model_dir: Path | None = None  # genai_config.json / config.json / tokenizer files live here
    seed: int = 0

    @classmethod
    def from_config(cls, feeds, model_dir: Path | str | None = None) -> FeedOptions:
        """From a ``config.FeedConfig`` (or None); ``model_dir`` fills in when the config has none."""
        if feeds is None:
            return cls(model_dir=Path(model_dir) if model_dir else None)
        folder = feeds.model_dir or model_dir
        return cls(dict(feeds.dims), Path(feeds.tokenizer) if feeds.tokenizer else None,
                   Path(folder) if folder else None)


# ---------------------------------------------------------------------------------------- roles
def _role(name: str, dtype: np.dtype, rank: int, bound: int | None) -> Role:
    low = name.lower()
    if "past" in low and rank >= 3:
        return Role.PAST
    if "mask" in low:
        return Role.MASK
    if np.issubdtype(dtype, np.floating):
        return Role.VALUES
    if "position" in low:
        return Role.POSITIONS
    if "type_ids" in low or "token_type" in low or "segment" in low:
        return Role.TYPES
    if bound is not None or re.search(r"input_ids|^ids$|tokens?$", low):
        return Role.TOKENS
    return Role.VALUES


def _index_bounds(model) -> dict[str, int]:
    """For each integer graph input that reaches a Gather's indices through value-preserving ops,
    the number of rows of the Gather's table (the smallest, if several)."""
    bounds: dict[str, int] = {}
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        seen, todo = set(), [v]
        while todo:
            cur = todo.pop()
            if id(cur) in seen:
                continue
            seen.add(id(cur))
            for use in cur.uses():
                node = use.node
                if node.op_type in GATHER_OPS and use.idx == 1 and node.inputs[0] is not None:
                    rows = (node.inputs[0].shape or [None])[0] if node.inputs[0].shape is not None else None
                    if isinstance(rows, int) and rows > 0:
                        bounds[v.name] = min(rows, bounds.get(v.name, rows))
                elif node.op_type in INDEX_PASSTHROUGH and use.idx == 0:
                    todo.extend(o for o in node.outputs if o is not None)
    return bounds


def _dim(d) -> int | str | None:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", d)
    return str(value) if value not in (None, "") else None


def input_specs(model) -> list[InputSpec]:
    """Model inputs (not initializers) of an ``onnx_ir`` model, with their roles and index bounds."""
    bounds = _index_bounds(model)
    specs = []
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        dt = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype(np.float32)
        shape = tuple(_dim(d) for d in (v.shape or ()))
        specs.append(InputSpec(v.name, dt, shape, bounds.get(v.name), _role(v.name, dt, len(shape), bounds.get(v.name))))
    return specs


# ---------------------------------------------------------------------------------------- model folder
def model_config(folder: Path | None) -> dict:
    """Decoder facts from ``genai_config.json`` or ``config.json`` in ``folder``:
    kv_heads, head_size, vocab (each only if found), and 'source' (the file)."""
    if folder is None:
        return {}
    for name in ("genai_config.json", "config.json"):
        path = Path(folder) / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        dec = data.get("model", {}).get("decoder", {}) if name == "genai_config.json" else data
        vocab_src = data.get("model", {}) if name == "genai_config.json" else data
        heads = dec.get("num_attention_heads") or dec.get("n_head")
        hidden = dec.get("hidden_size") or dec.get("n_embd")
        out = {"source": name}
        kv = dec.get("num_key_value_heads") or heads
        head = dec.get("head_size") or dec.get("head_dim") or (hidden // heads if hidden and heads else None)
        for key, value in (("kv_heads", kv), ("head_size", head), ("vocab", vocab_src.get("vocab_size"))):
            if isinstance(value, int) and value > 0:
                out[key] = value
        return out
    return {}


# ---------------------------------------------------------------------------------------- dims
_BATCH = re.compile(r"batch|^N$", re.IGNORECASE)
_PAST = re.compile(r"past|cache", re.IGNORECASE)
_SEQ = re.compile(r"seq|len|token|sentence|total", re.IGNORECASE)


class FeedPlan:
    """The dims of every input, resolved once per model (see the module docstring), and the filling
    of the inputs a data source leaves out. ``batch`` is whatever each feed's batch is."""

    def __init__(self, specs: list[InputSpec], options: FeedOptions = FeedOptions()):
        self.specs, self.options = specs, options
        self.values: dict[str, int] = {}
        self.why: dict[str, str] = {}
        self.batch_names: set[str] = set()
        self._folder = model_config(options.model_dir)
        self.has_past = any(s.role is Role.PAST for s in specs)
        self._resolve()

    # -- resolution
    def _set(self, name, value: int, why: str) -> None:
        if isinstance(name, str) and name not in self.values and name not in self.batch_names:
            self.values[name] = int(value)
            self.why[name] = why

    def _axis_value(self, roles: set[Role], axis: int, default: int) -> int:
        """The value of ``axis`` of the inputs in ``roles``: a fixed dim, a --dim, or ``default``."""
        for s in self.specs:
            if s.role in roles and len(s.shape) >= (axis + 1 if axis >= 0 else -axis):
                d = s.shape[axis]
                if isinstance(d, int) and d >= 0:
                    return d
                if d in self.values:
                    return self.values[d]
        return default

    def _resolve(self) -> None:
        user = dict(self.options.dims)
        every = [d for s in self.specs for d in s.shape if isinstance(d, str)]
        for name in every:
            if name in user:
                self._set(name, user[name], "--dim")
        past_specs = [s for s in self.specs if s.role is Role.PAST]
        # batch: axis 0 of every input (axis 1 of a stacked [2, batch, heads, past, head] cache)
        for s in self.specs:
            a = 1 if s.role is Role.PAST and len(s.shape) == 5 else 0
            if len(s.shape) > a and isinstance(s.shape[a], str) and s.shape[a] not in self.values:
                self.batch_names.add(s.shape[a])
        self.batch_names |= {n for n in every if _BATCH.search(n) and n not in self.values}
        seq_roles = {Role.TOKENS, Role.POSITIONS, Role.TYPES} | (set() if self.has_past else {Role.MASK})
        self.past = self._axis_value({Role.PAST}, -2, DEFAULT_PAST)
        self.sequence = self._axis_value(seq_roles, 1, DEFAULT_SEQUENCE)
        for s in past_specs:
            if len(s.shape) >= 3:
                self._set(s.shape[-2], self.past, "empty KV cache" if self.past == 0 else "past length")
        for s in self.specs:
            if s.role in seq_roles and len(s.shape) >= 2:
                self._set(s.shape[1], self.sequence, "sequence, default" if self.sequence == DEFAULT_SEQUENCE
                          else "sequence")
            if s.role is Role.MASK and self.has_past and s.shape:
                self._set(s.shape[-1], self.past + self.sequence, "past + sequence")
        cfg = self._folder
        for s in past_specs:
            if len(s.shape) >= 4:
                for axis, key in ((-3, "kv_heads"), (-1, "head_size")):
                    if key in cfg:
                        self._set(s.shape[axis], cfg[key], cfg["source"])
        for name in every:
            if _PAST.search(name):
                self._set(name, self.past, "past length")
            elif _SEQ.search(name):
                self._set(name, self.sequence, "sequence, default" if self.sequence == DEFAULT_SEQUENCE
                          else "sequence")
        for s in self.specs:  # [batch, sequence, features] float inputs (embeddings, encoder states)
            if s.role is Role.VALUES and np.issubdtype(s.dtype, np.floating) and len(s.shape) == 3 \
                    and isinstance(s.shape[2], int):
                self._set(s.shape[1], self.sequence, "sequence, default" if self.sequence == DEFAULT_SEQUENCE
                          else "sequence")
        for s in self.specs:
            if s.role is Role.VALUES and np.issubdtype(s.dtype, np.floating) and len(s.shape) == 4:
                nhwc = isinstance(s.shape[3], int) and s.shape[3] in (1, 3, 4) and not isinstance(s.shape[1], int)
                for axis in ((1, 2) if nhwc else (2, 3)):
                    self._set(s.shape[axis], DEFAULT_SPATIAL, "image size, default")
        missing = [(n, s.name, i) for s in self.specs for i, n in enumerate(s.shape)
                   if (isinstance(n, str) and n not in self.values and n not in self.batch_names) or n is None]
        if missing:
            name, inp, axis = missing[0]
            if name is None:
                raise DataSourceError(f"input {inp!r} has an unnamed symbolic dim (axis {axis}) that random or "
                                      "generated inputs cannot size; feed a folder of .npy/.npz files")
            raise DataSourceError(f"input {inp!r}: no value for the symbolic dim {name!r} (axis {axis}); "
                                  f"pass --dim {name}=INT")

    # -- shapes and filling
    def shape(self, spec: InputSpec, batch: int) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else batch if d in self.batch_names else self.values[d]
                     for d in spec.shape)

    def fixed_batch(self) -> int | None:
        """The batch every feed must have, when the model fixes it (axis 0 of its inputs)."""
        for s in self.specs:
            if s.role is not Role.PAST and s.shape:
                d = s.shape[0]
                if isinstance(d, int):
                    return d
                if d in self.values:
                    return self.values[d]
                return None
        return None

    def fill(self, feed: dict[str, np.ndarray], batch: int, sequence: int | None = None) -> dict[str, np.ndarray]:
        """``feed`` plus every model input it lacks, consistent with it (masks, positions, types, past)."""
        seq = self.sequence if sequence is None else sequence
        out = dict(feed)
        masks = [s for s in self.specs if s.role is Role.MASK and s.name in out]
        mask = out[masks[0].name] if masks else None
        for s in self.specs:
            if s.name in out:
                continue
            if s.role is Role.PAST:
                out[s.name] = self._past(s, batch)
            elif s.role is Role.MASK:
                shape = self.shape(s, batch)
                if len(shape) == 2:
                    shape = (batch, self.past + seq) if self.has_past else (batch, seq)
                out[s.name] = np.ones(shape, s.dtype)
                mask = out[s.name] if mask is None else mask
            elif s.role is Role.POSITIONS:
                out[s.name] = self._positions(s, batch, seq, mask)
            elif s.role is Role.TYPES:
                out[s.name] = np.zeros(self._seq_shape(s, batch, seq), s.dtype)
        return out

    def _seq_shape(self, spec: InputSpec, batch: int, seq: int) -> tuple[int, ...]:
        shape = list(self.shape(spec, batch))
        if len(shape) >= 2:
            shape[1] = seq
        return tuple(shape)

    def _positions(self, spec: InputSpec, batch: int, seq: int, mask: np.ndarray | None) -> np.ndarray:
        if mask is not None and mask.ndim == 2:  # padding-aware, as transformers computes them
            pos = np.maximum(np.cumsum(mask.astype(np.int64), axis=1) - 1, 0)[:, -seq:]
        else:
            pos = np.broadcast_to(np.arange(self.past, self.past + seq), (batch, seq))
        shape = self._seq_shape(spec, batch, seq)
        return np.ascontiguousarray(pos.reshape(shape) if len(shape) == 2 else pos[0].reshape(shape), spec.dtype)

    def _past(self, spec: InputSpec, batch: int) -> np.ndarray:
        shape = self.shape(spec, batch)
        if self.past == 0:
            return np.zeros(shape, spec.dtype)
        rng = np.random.default_rng(self.options.seed + 7)
        return rng.standard_normal(shape).astype(spec.dtype)

    def describe(self, batch: int, *, from_text: bool = False) -> str:
        """'batch_size=8 (batch), sequence_length=16 (sequence, default), ...' for reports and logs;
        ``from_text``: the sequence comes from the tokenised text, not from these dims."""
        parts = [f"{n}={batch} (batch)" for n in sorted(self.batch_names)]
        for n, v in self.values.items():
            why = self.why[n]
            if not (from_text and (why.startswith("sequence") or why.endswith("+ sequence"))):
                parts.append(f"{n}={v} ({why})")
        return ", ".join(parts)
