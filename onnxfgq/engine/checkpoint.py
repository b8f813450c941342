"""The work folder of a resumable block-by-block run (``--engine blocks``, ``--resume``).

``OUT.onnxfgq-work/`` beside the output holds:

- ``cache/``: the activation cache (engine/runner.ActivationCache): after block ``b`` finished, the
  inputs of the blocks after it, as that block produced them from the quantized blocks before;
- ``w{j}.npz``: the solved weight ``j`` (codes as uint8/uint16 when they fit, scales, zero
  points), written when it is solved;
- ``manifest.json``: what made the folder (the run's configuration and the input files' names, sizes
  and modification times), the cache's tensor ids and batches, and for every finished block its
  weights' geometry, notes and output errors. It is replaced atomically after a block's files are in
  place, so it never names a block whose files are incomplete.

A run without ``--resume`` refuses an existing work folder (naming it); ``--resume`` refuses a folder
made by another configuration or another input (one line saying what differs), continues from the
block after the last finished one, and writes the same bytes as an uninterrupted run: finished
blocks' codes are read back exactly, and the next block starts from the very activations the
uninterrupted run would have used. The folder is removed once the output is written; a failed or
interrupted run keeps it only when at least one block finished.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from onnxfgq.config import ConfigError

MANIFEST = "manifest.json"
VERSION = 1
log = logging.getLogger("onnxfgq")


def work_folder_for(output: Path) -> Path:
    """``OUT.onnxfgq-work`` beside the output ``OUT``."""
    output = Path(output).absolute()
    return output.with_name(output.name + ".onnxfgq-work")


def identity_of(files: list[Path], config_json: str) -> dict:
    """What a work folder is for: the configuration and the input files (name, size, mtime)."""
    stats = []
    for p in files:
        st = Path(p).stat()
        stats.append([Path(p).name, st.st_size, st.st_mtime_ns])
    return {"config": json.loads(config_json), "inputs": stats}


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out


class Work:
    """A resumable run's work folder (see the module docstring)."""

    def __init__(self, folder: Path, identity: dict, *, resume: bool = False):
        self.folder = Path(folder)
        self.identity = identity
        self.resume = resume
        self.manifest: dict = {}

    @property
    def cache(self) -> Path:
        return self.folder / "cache"

    # -- before any work
    def check(self) -> None:
        """Refuse what cannot be honoured, before the long part: a leftover folder without --resume,
        no folder or another run's folder with --resume."""
        exists = self.folder.exists()
        if exists and not self.resume:
            raise ConfigError("--resume", f"the work folder {self.folder} of an interrupted run exists: add "
                                          f"--resume to continue it, or delete it to start over")
        if not self.resume:
            return
        if not exists:
            raise ConfigError("--resume", f"no work folder {self.folder} to resume from")
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("--resume", f"{self.folder}: no readable {MANIFEST} ({type(exc).__name__}); "
                                          f"delete the folder to start over") from None
        if manifest.get("version") != VERSION:
            raise ConfigError("--resume", f"{self.folder} was written by another version of onnxfgq; delete it")
        theirs = manifest.get("identity", {})
        if theirs.get("inputs") != self.identity["inputs"]:
            raise ConfigError("--resume", f"{self.folder} was made from another input model (name, size or "
                                          f"modification time differ); delete it to start over")
        diff = _differences(theirs.get("config", {}), self.identity["config"])
        if diff:
            raise ConfigError("--resume", f"{self.folder} was made with other settings ({', '.join(diff[:4])}"
                                          f"{' ...' if len(diff) > 4 else ''} differ); rerun with the same "
                                          f"options, or delete it to start over")
        self.manifest = manifest

    # -- the run
    def start(self, blocks: int) -> None:
        """Create the folder (a fresh run) or check it matches this chain (a resumed one)."""
        if self.manifest:
            if self.manifest.get("blocks") != blocks:
                raise ConfigError("--resume", f"{self.folder} holds a run cut into {self.manifest.get('blocks')} "
                                              f"blocks, this one has {blocks}; delete it to start over")
            return
        self.cache.mkdir(parents=True, exist_ok=False)
        self.manifest = {"version": VERSION, "identity": self.identity, "blocks": blocks, "finished": -1,
                         "cache": {"ids": {}, "batches": 0}, "rows": 0, "weights": {}}
        self._write_manifest()

    @property
    def finished(self) -> int:
        """The last finished block (-1: none)."""
        return int(self.manifest.get("finished", -1))

    def save_weight(self, j: int, block: int, qw, *, awq_scale: np.ndarray | None = None, awq_note: str = "") -> dict:
        """Write weight ``j`` (of block ``block``) as solved, with its AWQ scale if any; returns its
        manifest entry, which ``finish_block`` records once the whole block is done."""
        codes = qw.codes
        low, top = int(codes.min(initial=0)), int(codes.max(initial=0))
        small = np.uint8 if low >= 0 and top < 256 else np.uint16 if low >= 0 and top < 65536 else codes.dtype
        path = self.folder / f"w{j}.npz"
        partial = self.folder / f"w{j}.partial.npz"
        extra = {} if awq_scale is None else {"awq_scale": awq_scale}
        np.savez(partial, codes=codes.astype(small, copy=False), scale=qw.qparams.scale,
                 zero_point=qw.qparams.zero_point, **extra)
        os.replace(partial, path)
        return {"block": block, "codes_dtype": str(codes.dtype), "block_shape": list(qw.qparams.block_shape),
                "bits": qw.qparams.qr.bits, "signed": qw.qparams.qr.signed, "note": qw.note, "awq_note": awq_note}

    def finish_block(self, index: int, entries: dict[int, dict], cache_ids: dict[str, int], batches: int,
                     rows: int) -> None:
        """Block ``index`` is finished: its weights' entries (files already written) and the cache's
        state (the next blocks' inputs already written), recorded in one atomic replace."""
        self.manifest["weights"].update({str(j): e for j, e in entries.items()})
        self.manifest["finished"] = index
        self.manifest["cache"] = {"ids": dict(cache_ids), "batches": batches}
        self.manifest["rows"] = max(int(self.manifest.get("rows", 0)), int(rows))
        self._write_manifest()

    def load_weights(self) -> dict[int, tuple]:
        """{weight index: (QuantizedWeight, output error or None, {"awq_scale", "awq_note"} if any)} of
        every finished block."""
        from onnxfgq.algorithms.base import QuantizedWeight
        from onnxfgq.quant import QParams
        from onnxfgq.quant.core import QRange

        out: dict[int, tuple] = {}
        for j, m in self.manifest.get("weights", {}).items():
            if int(m["block"]) > self.finished:
                continue
            with np.load(self.folder / f"w{j}.npz") as data:
                qp = QParams(data["scale"], data["zero_point"], tuple(m["block_shape"]), QRange(m["bits"], m["signed"]))
                qw = QuantizedWeight(data["codes"].astype(np.dtype(m["codes_dtype"])), qp, m["note"])
                extra = {"awq_scale": data["awq_scale"], "awq_note": m.get("awq_note", "")} \
                    if "awq_scale" in data.files else {}
            out[int(j)] = (qw, m.get("error"), extra)
        return out

    def _write_manifest(self) -> None:
        tmp = self.folder / (MANIFEST + ".partial")
        tmp.write_text(json.dumps(self.manifest))
        os.replace(tmp, self.folder / MANIFEST)

    # -- the end
    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def abandon(self) -> None:
        """The run failed or was interrupted: keep the folder if a block finished, else remove it."""
        if not self.folder.exists():
            return
        if self.finished >= 0:
            log.warning("onnxfgq: the work folder %s keeps %d of %s blocks: the same command with --resume "
                        "continues from there", self.folder, self.finished + 1, self.manifest.get("blocks"))
        else:
            self.remove()
