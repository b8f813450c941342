"""Folder mode: quantize the model inside an exported folder and write a folder its client runs as is.

LLM exports come as folders: the onnxruntime-genai builder writes ``genai_config.json`` (which names
the decoder file), the model, its external data and tokenizer files; optimum writes ``config.json``
beside ``model.onnx`` (+ ``model.onnx_data``). The output folder holds the same files under the same
names (the model keeps its file name, so the configs stay valid), with the quantized model and its
external data in place of the float ones.

The folder is written whole into a temporary folder beside ``-o`` and renamed at the end: a failure
or an interrupt leaves nothing behind, and the input folder is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from onnxfgq.errors import ModelLoadError, OutputPathError
from onnxfgq.graph import io

GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"


@dataclass(frozen=True)
class ModelFolder:
    root: Path
    model: Path  # the .onnx file to quantize
    client: str  # "onnxruntime-genai" | "optimum" | "onnxruntime"

    @property
    def tokenizer(self) -> Path | None:
        """The folder itself when it holds a Hugging Face tokenizer (the default for ``text:`` data)."""
        return self.root if (self.root / "tokenizer.json").is_file() or \
            (self.root / "tokenizer_config.json").is_file() else None


def open_folder(root: Path) -> ModelFolder:
    """Which model file a folder's client loads, and which client that is."""
    root = Path(root)
    genai = root / GENAI_CONFIG
    if genai.is_file():
        try:
            name = json.loads(genai.read_text())["model"]["decoder"]["filename"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{genai}: no model.decoder.filename ({type(exc).__name__}: {exc})") from None
        model = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not model.is_file():
            raise ModelLoadError(f"{genai}: model.decoder.filename {name!r} is not a file in {root}")
        return ModelFolder(root, model, "onnxruntime-genai")
    models = sorted(p for p in root.iterdir() if p.suffix == ".onnx" and p.is_file())
    if not models:
        raise ModelLoadError(f"{root}: no .onnx file in the folder")
    if len(models) > 1:
        preferred = [p for p in models if p.name == "model.onnx"]
        if not preferred:
            names = ", ".join(p.name for p in models)
            raise ModelLoadError(f"{root}: several models ({names}); pass the one to quantize as MODEL")
        models = preferred
    client = "optimum" if (root / HF_CONFIG).is_file() else "onnxruntime"
    return ModelFolder(root, models[0], client)


def default_output(root: Path, bits: int) -> Path:
    root = Path(root)
    return root.with_name(f"{root.name}.{bits}bit")


def check_output_folder(folder: ModelFolder, out: Path) -> None:
    """-o must be a new (or empty) folder outside the input folder, in an existing directory."""
    src, dst = folder.root.resolve(), Path(out).resolve()
    if dst == src or dst.is_relative_to(src):
        raise OutputPathError(f"{out}: the output folder must not be the input folder or inside it")
    if src.is_relative_to(dst):
        raise OutputPathError(f"{out}: the output folder must not contain the input folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise OutputPathError(f"{out}: already exists; remove it or choose another -o folder")
    if not dst.parent.is_dir():
        raise OutputPathError(f"{dst.parent}: output directory does not exist")


class StagedFolder(io.Staged):
    """The output folder, prepared in a hidden folder beside ``out``: the folder's other files are
    copied on entry, ``path`` is where the quantized model goes, ``commit()`` renames the whole folder.
    Leaving the ``with`` block without a commit (an error, an interrupt) removes everything."""

    def __init__(self, folder: ModelFolder, out: str | os.PathLike):
        super().__init__(out)
        self.source = folder

    def __enter__(self) -> StagedFolder:  # noqa: PYI034 - Python 3.10 has no typing.Self
        check_output_folder(self.source, self.out)
        self.folder = Path(tempfile.mkdtemp(prefix=f".onnxfgq-{self.out.name}-", dir=self.out.absolute().parent))
        self.folder.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        try:
            self._copy_others()  # first, so the staged folder is complete when the report evaluates it
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _copy_others(self) -> None:
        """Every file but the float model and its external data (the quantized ones replace them)."""
        tmp = self.folder
        skip = {self.source.model.resolve(), *io.external_inputs(io.load(self.source.model))}
        for entry in sorted(self.source.root.iterdir()):
            if entry.resolve() in skip or entry.name.startswith(".onnxfgq-"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=False)
            else:
                shutil.copy2(entry, tmp / entry.name)

    @property
    def path(self) -> Path:
        assert self.folder is not None, "use StagedFolder in a with block"
        return self.folder / self.source.model.name

    def commit(self) -> list[Path]:
        """Rename the complete staged folder into place."""
        tmp = self.folder
        if self.out.exists():  # an empty folder (checked on entry): the rename replaces it
            self.out.rmdir()
        os.replace(tmp, self.out)
        self.folder = None
        return sorted(self.out.iterdir())


def quantize_folder(root: Path, out: Path, config=None, *, progress=None, external: bool | None = None):
    """``api.quantize_file`` on the folder's model, writing the whole folder ``out``; returns the report
    (paths name the model files; ``notes`` says which client the folder is for)."""
    from onnxfgq import api

    folder = open_folder(root)
    kwargs = {"progress": progress} if progress is not None else {}
    with StagedFolder(folder, out) as staged:
        report = api.quantize_file(folder.model, staged.path, config, external=external, **kwargs)
        staged.commit()
    annotate(report, folder, Path(out))
    return report


def annotate(report, folder: ModelFolder, out: Path) -> None:
    """Paths and the client note of a folder-mode report."""
    report.input_path, report.output_path = str(folder.model), str(Path(out) / folder.model.name)
    report.notes.append(describe(folder, Path(out)))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe(folder: ModelFolder, out: Path) -> str:
    """The report's note: what was written and for which client."""
    files = {"onnxruntime-genai": f"{GENAI_CONFIG} and tokenizer files copied",
             "optimum": f"{HF_CONFIG} and tokenizer files copied",
             "onnxruntime": "other files copied"}[folder.client]
    return f"folder for {folder.client}: {out}/{folder.model.name} quantized, {files}"


__all__ = ["ModelFolder", "StagedFolder", "annotate", "check_output_folder", "default_output", "describe",
           "open_folder", "quantize_folder"]
