"""Data sources that feed models, batch by batch.

Every source follows onnxruntime's ``CalibrationDataReader`` protocol: ``get_next()`` returns a
``{input_name: array}`` feed, or ``None`` when exhausted; existing onnxruntime readers work
unchanged wherever a reader is accepted. A source spec on the command line is one of:

- ``random``: inputs drawn from the model's input shapes (symbolic dims from ``dims``);
- a folder of ``.npy`` / ``.npz`` files (keys or file stems are input names);
- ``text:FILE``: one sentence per line, tokenised with a Hugging Face tokenizer (``tokenizer``
  folder, by default the folder holding FILE).
- ``images:DIR[?size=H,W&mean=..&std=..&layout=nchw|nhwc]``: image files, resized and normalised
  (see ``onnxfgq.calibration.images``; needs Pillow).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from onnxfgq.errors import OnnxfgqError

DEFAULT_DIM = 1  # symbolic dims without an override
DEFAULT_SEQUENCE = 16  # symbolic dims whose name looks like a sequence length


class DataSourceError(OnnxfgqError):
    """A data source that cannot be opened or does not fit the model."""


class CalibrationDataReader(Protocol):
    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    index_bound: int | None = None  # for integer inputs used as Gather indices: the table's rows


def input_specs(model) -> list[InputSpec]:
    """Model inputs (not initializers) of an ``onnx_ir`` model, with index bounds for token-id inputs."""
    import onnx_ir as ir

    bounds: dict[str, int] = {}
    for node in model.graph:
        if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] is not None:
            idx, table = node.inputs[1], node.inputs[0]
            if idx.is_graph_input() and table is not None and table.shape is not None:
                dim0 = table.shape[0]
                if isinstance(dim0, int):
                    bounds[idx.name] = dim0
    specs = []
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        dt = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
        shape = tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in (v.shape or ()))
        specs.append(InputSpec(v.name, np.dtype(dt), shape, bounds.get(v.name)))
    del ir
    return specs


def _resolve_dim(d, dims: Mapping[str, int], batch: int) -> int:
    if isinstance(d, int) and d > 0:
        return d
    name = str(d or "")
    if name in dims:
        return int(dims[name])
    if re.search(r"batch|^N$", name, re.I):
        return batch
    if re.search(r"seq|len|token|sentence|past", name, re.I):
        return DEFAULT_SEQUENCE
    return DEFAULT_DIM


class RandomReader:
    """``num_samples`` random samples in batches of ``batch_size``, reproducible from ``seed``."""

    def __init__(self, specs: list[InputSpec], *, num_samples: int = 8, batch_size: int = 1,
                 dims: Mapping[str, int] | None = None, seed: int = 0):
        self.specs, self.dims, self.batch_size = specs, dict(dims or {}), batch_size
        self._left = num_samples
        self._rng = np.random.default_rng(seed)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._left <= 0:
            return None
        batch = min(self.batch_size, self._left)
        self._left -= batch
        feed = {}
        for s in self.specs:
            shape = tuple(_resolve_dim(d, self.dims, batch) for d in s.shape)
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = self._rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = np.ones(shape, dtype=np.bool_)
            elif s.index_bound:
                feed[s.name] = self._rng.integers(0, s.index_bound, shape).astype(s.dtype)
            else:  # masks, type ids, positions: the neutral value
                feed[s.name] = (np.ones if "mask" in s.name.lower() else np.zeros)(shape, dtype=s.dtype)
        return feed


class NpyFolderReader:
    """Each ``.npz`` file is one feed (keys = input names); ``.npy`` files named ``<input>*.npy``
    are matched up in sorted order when the model has one input, or grouped by ``<index>_<input>``."""

    def __init__(self, folder: Path, specs: list[InputSpec], *, num_samples: int | None = None):
        folder = Path(folder)
        names = [s.name for s in specs]
        files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz"))
        if not files:
            raise DataSourceError(f"{folder}: no .npy or .npz files")
        self._feeds: list[Path | dict] = []
        for p in files:
            if p.suffix == ".npz":
                self._feeds.append(p)
            elif len(names) == 1:
                self._feeds.append({names[0]: p})
        if not self._feeds:
            raise DataSourceError(f"{folder}: .npy files need a single-input model; use .npz for {names}")
        self._names = names
        self._it = iter(self._feeds[:num_samples] if num_samples else self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        item = next(self._it, None)
        if item is None:
            return None
        if isinstance(item, Path):
            with np.load(item) as data:
                feed = {k: data[k] for k in data.files}
        else:
            feed = {k: np.load(v) for k, v in item.items()}
        missing = set(self._names) - set(feed)
        if missing:
            raise DataSourceError(f"{item}: missing model inputs {sorted(missing)}")
        return {k: feed[k] for k in self._names}


class TextReader:
    """Sentences (one per line) tokenised in batches, padded per batch."""

    def __init__(self, text_file: Path, specs: list[InputSpec], *, tokenizer: Path | None = None,
                 num_samples: int | None = None, batch_size: int = 32, max_length: int = 128):
        text_file = Path(text_file)
        if not text_file.is_file():
            raise DataSourceError(f"{text_file}: no such text file")
        tok_dir = Path(tokenizer) if tokenizer else text_file.parent
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:
            raise DataSourceError(f"{tok_dir}: cannot load a tokenizer ({exc}); pass --tokenizer DIR") from None
        lines = [s.strip() for s in text_file.read_text().splitlines() if s.strip()]
        self._lines = lines[:num_samples] if num_samples else lines
        self._specs, self._batch, self._max_length, self._pos = specs, batch_size, max_length, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._lines):
            return None
        chunk = self._lines[self._pos:self._pos + self._batch]
        self._pos += len(chunk)
        enc = self._tok(chunk, padding=True, truncation=True, max_length=self._max_length, return_tensors="np")
        feed = {}
        for s in self._specs:
            if s.name not in enc:
                raise DataSourceError(f"the tokenizer gives no {s.name!r} (it gives {sorted(enc.keys())})")
            feed[s.name] = enc[s.name].astype(s.dtype)
        return feed

    def __len__(self) -> int:
        return len(self._lines)


def open_source(spec: str, model, *, num_samples: int | None = None, batch_size: int = 8,
                dims: Mapping[str, int] | None = None, tokenizer: Path | None = None, seed: int = 0):
    """A reader for the source ``spec`` (see the module docstring) on an ``onnx_ir`` model."""
    specs = input_specs(model)
    if spec == "random":
        return RandomReader(specs, num_samples=num_samples or 8, batch_size=batch_size, dims=dims, seed=seed)
    if spec.startswith("text:"):
        return TextReader(Path(spec[5:]), specs, tokenizer=tokenizer, num_samples=num_samples,
                          batch_size=batch_size)
    if spec.startswith("images:"):
        from onnxfgq.calibration.images import open_images

        return open_images(spec, specs, num_samples=num_samples, batch_size=batch_size)
    path = Path(spec)
    if path.is_dir():
        return NpyFolderReader(path, specs, num_samples=num_samples)
    raise DataSourceError(f"--data {spec!r}: expected 'random', 'text:FILE', 'images:DIR' or a folder of "
                          ".npy/.npz files")


def iterate(reader: CalibrationDataReader) -> Iterator[dict[str, np.ndarray]]:
    while (feed := reader.get_next()) is not None:
        yield feed
