"""Data sources that feed models, batch by batch.

Every source follows onnxruntime's ``CalibrationDataReader`` protocol: ``get_next()`` returns a
``{input_name: array}`` feed, or ``None`` when exhausted; existing onnxruntime readers work
unchanged wherever a reader is accepted. A source spec on the command line is one of:

- ``random``: inputs drawn from the model's input shapes (symbolic dims: see ``feeds``);
- a folder of ``.npy`` / ``.npz`` files (keys or file stems are input names);
- ``text:FILE``: one sentence per line, tokenised with a Hugging Face tokenizer (``--tokenizer``
  folder, by default the model's folder, else the folder holding FILE); decoder inputs are filled.
- ``images:DIR[?size=H,W&mean=..&std=..&layout=nchw|nhwc]``: image files, resized and normalised
  (see ``onnxfgq.calibration.images``; needs Pillow).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from onnxfgq.calibration.feeds import (
    DEFAULT_SEQUENCE,
    DataSourceError,
    FeedOptions,
    FeedPlan,
    InputSpec,
    Role,
    input_specs,
    model_config,
)

__all__ = ["DEFAULT_SEQUENCE", "CalibrationDataReader", "DataSourceError", "FeedOptions", "InputSpec",
           "NpyFolderReader", "RandomReader", "TextReader", "input_specs", "iterate", "open_source"]


class CalibrationDataReader(Protocol):
    def get_next(self) -> dict[str, np.ndarray] | None: ...


class RandomReader:
    """``num_samples`` random samples in batches of ``batch_size``, reproducible from ``seed``.

    When the model fixes its batch dim, every feed has that batch and there are as many feeds as it
    takes to give ``num_samples`` samples. Token ids are uniform over the Gather table they index;
    masks, positions, type ids and the KV cache are filled by the feed plan (see feeds.py).
    ``samples`` counts what was given so far; ``description`` says how every dim was chosen."""

    def __init__(self, specs: list[InputSpec], *, num_samples: int = 8, batch_size: int = 1,
                 dims: Mapping[str, int] | None = None, seed: int = 0, options: FeedOptions | None = None):
        options = options or FeedOptions(dims=dict(dims or {}), seed=seed)
        self.plan = FeedPlan(specs, options)
        self.specs, self.batch_size, self.num_samples = specs, batch_size, num_samples
        self.fixed_batch = self.plan.fixed_batch()
        self.samples = 0
        self._rng = np.random.default_rng(options.seed)
        cfg_vocab = model_config(options.model_dir).get("vocab")
        self._bounds = {s.name: s.index_bound or (cfg_vocab if s.role is Role.TOKENS else None) for s in specs}
        ranges = [f"{s.name} uniform in [0, {self._bounds[s.name]})" for s in specs if self._bounds[s.name]]
        zeros = [s.name for s in specs if s.role in (Role.TOKENS, Role.VALUES) and not self._bounds[s.name]
                 and not np.issubdtype(s.dtype, np.floating) and s.dtype != np.bool_]
        self.description = "; ".join(filter(None, [
            "random inputs: " + (self.plan.describe(self.fixed_batch or min(batch_size, num_samples))
                                 or "all dims fixed"), ", ".join(ranges),
            f"{', '.join(zeros)}: zeros (no Gather table found)" if zeros else ""]))

    def __len__(self) -> int:
        return self.num_samples

    def get_next(self) -> dict[str, np.ndarray] | None:
        left = self.num_samples - self.samples
        if left <= 0:
            return None
        batch = self.fixed_batch or min(self.batch_size, left)
        self.samples += batch
        feed = {}
        for s in self.specs:
            if s.role in (Role.MASK, Role.POSITIONS, Role.TYPES, Role.PAST):
                continue  # filled by the plan, consistent with the rest
            shape = self.plan.shape(s, batch)
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = self._rng.standard_normal(shape).astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = np.ones(shape, dtype=np.bool_)
            elif self._bounds[s.name]:
                feed[s.name] = self._rng.integers(0, self._bounds[s.name], shape).astype(s.dtype)
            else:
                feed[s.name] = np.zeros(shape, dtype=s.dtype)
        return self.plan.fill(feed, batch)


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")


def find_tokenizer(explicit: Path | None, model_dir: Path | None, text_file: Path) -> Path:
    """``--tokenizer`` if given, else the model's folder, else the text file's: the first that has one."""
    def has(d: Path | None) -> bool:
        return d is not None and any((Path(d) / f).is_file() for f in TOKENIZER_FILES)

    wanted = f"({', '.join(TOKENIZER_FILES)})"
    if explicit is not None:
        if not has(explicit):
            raise DataSourceError(f"--tokenizer {explicit}: no tokenizer found in {explicit} {wanted}")
        return Path(explicit)
    folders = list(dict.fromkeys(d for d in (model_dir, text_file.parent) if d is not None))
    for d in folders:
        if has(d):
            return Path(d)
    raise DataSourceError(f"no tokenizer found in {' or '.join(map(str, folders))} {wanted}; pass --tokenizer DIR")


class TextReader:
    """Sentences (one per line) tokenised in batches, right-padded per batch (to the model's length
    if it fixes one). Inputs the tokenizer does not give (a decoder's position ids and KV cache,
    missing masks or type ids) are filled by the feed plan, consistent with the tokens."""

    def __init__(self, text_file: Path, specs: list[InputSpec], *, tokenizer: Path | None = None,
                 num_samples: int | None = None, batch_size: int = 32, max_length: int = 128,
                 options: FeedOptions | None = None):
        text_file = Path(text_file)
        if not text_file.is_file():
            raise DataSourceError(f"{text_file}: no such text file")
        options = options or FeedOptions(tokenizer=tokenizer)
        tok_dir = find_tokenizer(options.tokenizer or tokenizer, options.model_dir, text_file)
        try:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:  # noqa: BLE001 (whatever transformers raises: one line, not a traceback)
            raise DataSourceError(f"{tok_dir}: cannot load the tokenizer ({exc})") from None
        self.plan = FeedPlan(specs, options)
        lines = [s.strip() for s in text_file.read_text().splitlines() if s.strip()]
        self._lines = lines[:num_samples] if num_samples else lines
        tokens = [sp for sp in specs if sp.role is Role.TOKENS]
        fixed_len = tokens[0].shape[1] if tokens and len(tokens[0].shape) > 1 else None
        self._length = fixed_len if isinstance(fixed_len, int) else None
        self._max_length = self._length or max_length
        self._batch = self.plan.fixed_batch() or batch_size
        self._pad = next((i for i in (self._tok.pad_token_id, self._tok.eos_token_id) if i is not None), 0)
        self._specs, self._pos, self.samples = specs, 0, 0
        self.description = "; ".join(filter(None, [f"tokenizer {tok_dir}",
                                                   self.plan.describe(min(self._batch, len(self._lines)) or 1,
                                                                      from_text=True)]))

    def _encode(self, chunk: list[str]) -> dict[str, np.ndarray]:
        enc = self._tok(chunk, truncation=True, max_length=self._max_length)
        ids = [list(x) for x in enc["input_ids"]]
        width = self._length or max(len(x) for x in ids)
        out = {}
        for key, rows in enc.items():
            fill = self._pad if key == "input_ids" else 0
            out[key] = np.array([list(r) + [fill] * (width - len(r)) for r in rows], np.int64)
        if "attention_mask" not in out:
            out["attention_mask"] = np.array([[1] * len(r) + [0] * (width - len(r)) for r in ids], np.int64)
        return out

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = self._lines[self._pos:self._pos + self._batch]
        if not chunk or (self.plan.fixed_batch() and len(chunk) < self._batch):
            return None
        self._pos += len(chunk)
        enc = self._encode(chunk)
        by_role = {Role.TOKENS: "input_ids", Role.MASK: "attention_mask", Role.TYPES: "token_type_ids"}
        feed = {}
        for s in self._specs:
            key = s.name if s.name in enc else by_role.get(s.role)
            if key in enc:
                feed[s.name] = enc[key].astype(s.dtype)
        feed = self.plan.fill(feed, len(chunk), enc["input_ids"].shape[1])
        missing = [s.name for s in self._specs if s.name not in feed]
        if missing:
            raise DataSourceError(f"text: the tokenizer gives no {missing[0]!r} (it gives {sorted(enc)})")
        self.samples += len(chunk)
        return feed

    def __len__(self) -> int:
        return len(self._lines)


SPEC_FORMS = "expected 'random', 'text:FILE', 'images:DIR' or a folder of .npy/.npz files"


def open_source(spec: str, model, *, num_samples: int | None = None, batch_size: int = 8,
                dims: Mapping[str, int] | None = None, tokenizer: Path | None = None, seed: int = 0,
                options: FeedOptions | None = None, option: str = "--data"):
    """A reader for the source ``spec`` (see the module docstring) on an ``onnx_ir`` model: the one
    function behind every calibration and evaluation feed. ``options`` (``--dim``, ``--tokenizer``,
    the model's folder) override ``dims``/``tokenizer``/``seed``; ``option`` names the flag in errors."""
    if options is None:
        options = FeedOptions(dims=dict(dims or {}), tokenizer=Path(tokenizer) if tokenizer else None, seed=seed)
    specs = input_specs(model)
    try:
        if spec == "random":
            return RandomReader(specs, num_samples=num_samples or 8, batch_size=batch_size, options=options)
        if spec.startswith("text:"):
            return TextReader(Path(spec[5:]), specs, num_samples=num_samples, batch_size=batch_size,
                              options=options)
        if spec.startswith("images:"):
            from onnxfgq.calibration.images import open_images

            return open_images(spec, specs, num_samples=num_samples, batch_size=batch_size)
        path = Path(spec)
        if path.is_dir():
            return NpyFolderReader(path, specs, num_samples=num_samples)
    except DataSourceError as exc:
        raise DataSourceError(f"{option} {spec}: {exc}") from None
    raise DataSourceError(f"{option} {spec!r}: {SPEC_FORMS}")


def iterate(reader: CalibrationDataReader) -> Iterator[dict[str, np.ndarray]]:
    while (feed := reader.get_next()) is not None:
        yield feed
