"""Quantized tensors written to disk as they are made, so that an output model never sits in memory.

On a model larger than memory the quantized weights alone (about a fifth of an FP32 model) outgrow
what a machine can hold: 4.5 GB of MatMulNBits blobs for a 27 GB 7B-shaped FP32 model. The emitter
hands each tensor it makes to a ``Spool``, which appends the bytes to one file in a hidden folder
beside the output and returns an ``ExternalTensor`` that points at them. Saving the model then copies
those bytes into the output's data file in chunks (onnx_ir streams external tensors), and the folder
is removed when the ``with`` block ends, whether the run succeeded or not.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

SPOOL_MIN_BYTES = 1024  # smaller tensors stay in memory (io.save keeps them inline, as before)
_NAME = "spool.data"


class Spool:
    """Appends tensors to ``folder/spool.data``; use as a context manager (``Spool.beside(out)``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._file = open(folder / _NAME, "wb")  # noqa: SIM115 - closed by close()
        self.size = 0

    @classmethod
    def beside(cls, out: str | os.PathLike) -> Spool:
        """A spool in a new hidden folder next to ``out`` (same file system: the final copy is local)."""
        folder = Path(tempfile.mkdtemp(prefix=".onnxfgq-spool-", dir=Path(out).absolute().parent))
        return cls(folder)

    def put(self, tensor: ir.TensorProtocol) -> ir.TensorProtocol:
        """``tensor``'s bytes appended to the spool, as an external tensor (small ones are returned as is)."""
        if tensor.nbytes < SPOOL_MIN_BYTES or isinstance(tensor, ir.ExternalTensor):
            return tensor
        offset = self.size
        tensor.tofile(self._file)  # no bytes copy of the tensor
        self._file.flush()  # readable through the path at once (a save or a session may read it)
        self.size = self._file.tell()
        return ir.ExternalTensor(_NAME, offset=offset, length=self.size - offset, dtype=tensor.dtype,
                                 shape=tensor.shape, name=tensor.name, base_dir=str(self.folder))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
