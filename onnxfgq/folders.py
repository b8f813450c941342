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


def write_folder(folder: ModelFolder, out: Path, quantize_into) -> list[Path]:
    """Copy the folder's other files and call ``quantize_into(tmp_model_path)`` inside a temporary
    folder beside ``out``, then rename it to ``out``. Returns the model files written (under ``out``).

    The model and the external data it reads are not copied: ``quantize_into`` writes their
    quantized replacement (the model under its own name, so configs naming it stay valid)."""
    from onnxfgq.graph import io

    check_output_folder(folder, out)
    out = Path(out)
    skip = {folder.model.resolve(), *io.external_inputs(io.load(folder.model))}
    tmp = Path(tempfile.mkdtemp(prefix=f".onnxfgq-{out.name}-", dir=out.resolve().parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
        written = [Path(p) for p in quantize_into(tmp / folder.model.name)]
        for entry in sorted(folder.root.iterdir()):
            if entry.resolve() in skip or entry.name.startswith(".onnxfgq-"):
                continue
            if entry.is_dir():
                shutil.copytree(entry, tmp / entry.name, symlinks=False)
            else:
                shutil.copy2(entry, tmp / entry.name)
        if out.exists():  # an empty folder (checked above): rename replaces it
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / p.relative_to(tmp) for p in written]


def quantize_folder(root: Path, out: Path, config=None, *, progress=None, external: bool | None = None):
    """``api.quantize_file`` on the folder's model, writing the whole folder ``out``; returns the report
    (paths name the folders; ``notes`` says which client the folder is for)."""
    from onnxfgq import api

    folder = open_folder(root)
    kwargs = {"progress": progress} if progress is not None else {}
    reports = []

    def quantize_into(path: Path) -> list[Path]:
        reports.append(api.quantize_file(folder.model, path, config, external=external, **kwargs))
        return [Path(reports[0].output_path)] + [p for p in path.parent.iterdir() if p.name == path.name + ".data"]

    write_folder(folder, Path(out), quantize_into)
    report = reports[0]
    report.input_path, report.output_path = str(folder.model), str(Path(out) / folder.model.name)
    report.notes.append(describe(folder, Path(out)))
    return report


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


__all__ = ["ModelFolder", "check_output_folder", "default_output", "describe", "open_folder", "quantize_folder",
           "write_folder"]
