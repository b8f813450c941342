"""Loading, simplifying and atomically saving models (onnx_ir; weights stay lazy until read)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxfgq.errors import ModelLoadError, OutputPathError, ValidationError
from onnxfgq.graph import external as extdata

PROTOBUF_LIMIT = extdata.PROTOBUF_LIMIT


def load(path: str | os.PathLike) -> ir.Model:
    """Load ``path`` lazily; every external tensor is checked and bound to the model's folder
    (see ``external``) before anything is read."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder, not an ONNX model file")
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.outputs and not len(model.graph):
        raise ModelLoadError(f"{path}: not an ONNX model (empty graph)")
    try:
        extdata.bind(model, path.absolute().parent)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    return model


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


@dataclass(frozen=True)
class SimplifyResult:
    model: ir.Model
    note: str  # what happened, for the report


def simplify(model: ir.Model) -> SimplifyResult:
    """Constant folding and shape simplification with onnxsim; the input model on any failure."""
    if weight_bytes(model) > PROTOBUF_LIMIT:
        return SimplifyResult(model, "onnxsim skipped: the model is over protobuf's 2 GB limit")
    try:
        import onnxsim

        # onnxsim wants the weights in the proto (its C++ side would resolve external data against cwd).
        proto = ir.to_proto(extdata.inlined(model))
        simplified, ok = onnxsim.simplify(proto)
        if not ok:
            return SimplifyResult(model, "onnxsim could not validate its result; using the unsimplified graph")
        return SimplifyResult(ir.from_proto(simplified), "simplified with onnxsim")
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return SimplifyResult(model, f"onnxsim failed ({msg[:160]}); using the unsimplified graph")


def check_output_path(out: Path, inputs: list[Path]) -> None:
    out = out.resolve()
    for p in inputs:
        if p.exists() and out == p.resolve():
            raise OutputPathError(f"{out}: refusing to overwrite the input model; choose another -o path")
    data = Path(str(out) + ".data")
    for p in inputs:
        if p.exists() and data == p.resolve():
            raise OutputPathError(f"{data}: would overwrite the input's external data file")
    check_writable(out, "-o")


def check_writable(path: Path, option: str) -> None:
    """Refuse, before any work, a file path that cannot be written (a folder, a missing or read-only one)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; give a file path")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OutputPathError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: the folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option} {path}: exists and is not writable")


class Staged:
    """An output prepared in a hidden folder beside ``out`` and moved into place only by ``commit()``.

    ``path`` has ``out``'s file name, so external data written beside it keeps the name the model refers
    to. Leaving the ``with`` block (error, SIGINT/SIGTERM raised as exceptions) removes the folder and
    whatever was not committed."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.folder: Path | None = None

    def __enter__(self) -> Staged:
        self.folder = Path(tempfile.mkdtemp(prefix=".onnxfgq-", dir=self.out.absolute().parent))
        return self

    @property
    def path(self) -> Path:
        assert self.folder is not None, "use Staged in a with block"
        return self.folder / self.out.name

    def commit(self) -> list[Path]:
        """Move the staged files into place (external data first, the model last); returns them."""
        written = []
        data = self.path.with_name(self.out.name + ".data")
        if data.exists():
            os.replace(data, self.out.with_name(data.name))
            written.append(self.out.with_name(data.name))
        os.replace(self.path, self.out)
        return [self.out, *written]

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def pause_point(name: str) -> None:
    """Test hook: with ONNXFGQ_TEST_PAUSE_AT=name, say so on stderr and wait (for a signal to arrive)."""
    if os.environ.get("ONNXFGQ_TEST_PAUSE_AT") == name:
        import sys
        import time

        print(f"onnxfgq-test: paused at {name}", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("ONNXFGQ_TEST_PAUSE_SECONDS", "30")))


def external_inputs(model: ir.Model) -> list[Path]:
    return extdata.files(model)


def save(model: ir.Model, out: str | os.PathLike, *, external: bool | None = None,
         validate: Callable[[Path], None] | None = None) -> list[Path]:
    """Write ``model`` to ``out`` atomically; returns the files written.

    Everything is written into a temporary folder beside ``out``, checked with ``validate(path)``
    there, and renamed into place only when complete and valid (external data first, the model
    last), so a failure never leaves a partial output. ``external=None`` chooses external data when
    the weights approach protobuf's limit.
    """
    out = Path(out)
    if external is None:
        external = weight_bytes(model) > PROTOBUF_LIMIT // 2
    data_name = out.name + ".data"
    tmpdir = Path(tempfile.mkdtemp(prefix=".onnxfgq-", dir=out.parent))
    try:
        tmp_model = tmpdir / out.name
        if external:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
        else:
            # One self-contained file: weights still in the input's files are read in (left as references,
            # they would point at a data file beside the output that does not exist).
            if weight_bytes(model) > PROTOBUF_LIMIT:
                raise OutputPathError(f"{out}: {weight_bytes(model) / 2**30:.1f} GiB of weights do not fit in one "
                                      f"file (protobuf's 2 GiB limit); write external data")
            ir.save(extdata.inlined(model), tmp_model)
        pause_point("save")
        if validate is not None:
            validate(tmp_model)
        written = []
        tmp_data = tmpdir / data_name
        if tmp_data.exists():
            os.replace(tmp_data, out.parent / data_name)
            written.append(out.parent / data_name)
        os.replace(tmp_model, out)
        written.insert(0, out)
        return written
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


@dataclass(frozen=True)
class Gate:
    """What the output must pass: what the input passed (onnx.checker, onnxruntime's load).

    A deferred gate (``input`` set, nothing checked yet) checks the input only where the output fails:
    for a run of seconds, checking the input up front cost as much as the quantization (MiniLM RTN:
    1.5 s of 4.2)."""

    checker: bool = True
    runtime: bool = True
    note: str = ""  # for the report: which check the input fails, so the output is not held to it
    input: Path | None = None  # a deferred gate's input model
    custom_ops: bool = False


# Up to this much weight, the input is loaded in onnxruntime up front (seconds); beyond, only when
# onnx.checker fails (then onnxruntime is all that can vouch for it).
ORT_PRECHECK_BYTES = 2 << 30


def input_gate(path: Path, model: ir.Model, *, custom_ops: bool = False, defer: bool = False) -> Gate:
    """Check the input before any work: the output is later held to the checks the input passes.

    An input that fails both onnx.checker and onnxruntime's load is refused (ValidationError). With
    ``defer`` (runs whose work takes seconds), the input is checked only if the output fails a check."""
    if defer:
        return Gate(input=Path(path), custom_ops=custom_ops)
    checker_error = _checker_error(path)
    runtime_error = None
    if checker_error is not None or weight_bytes(model) <= ORT_PRECHECK_BYTES:
        runtime_error = _runtime_error(path, custom_ops=custom_ops, optimize=False)
    return _gate_from(path, checker_error, runtime_error)


def _gate_from(path: Path, checker_error: str | None, runtime_error: str | None) -> Gate:
    if checker_error is not None and runtime_error is not None:
        raise ValidationError(f"{path}: fails onnx.checker ({checker_error}) and onnxruntime cannot load it "
                              f"({runtime_error})")
    if checker_error is not None:
        return Gate(checker=False, note=f"the input fails onnx.checker ({checker_error}); the output is "
                                        f"validated by onnxruntime's load only")
    if runtime_error is not None:
        return Gate(runtime=False, note=f"onnxruntime cannot load the input ({runtime_error}); the output is "
                                        f"validated by onnx.checker only")
    return Gate()


def _first_line(exc: Exception, limit: int = 200) -> str:
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line[:limit]


def _checker_error(path: Path) -> str | None:
    try:  # by path: external data (already contained) is not read, and >2 GB models work
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:  # noqa: BLE001 - any checker failure is an answer, not a crash
        return _first_line(exc)
    return None


def _runtime_error(path: Path, *, custom_ops: bool, optimize: bool = True) -> str | None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    if not optimize:  # the input's check: a load, not a compile (seconds)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if custom_ops:
        from onnxfgq import ops

        ops.register(so)
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return _first_line(exc)
    return None


def check(path: Path, *, custom_ops: bool = False, gate: Gate = Gate()) -> Gate:
    """The gate before the rename: onnx.checker (where the input passed it), then an onnxruntime load
    (where the input loaded). Returns the gate that applied (a deferred one resolved, with its note)."""
    checker_error = _checker_error(path) if gate.checker else None
    runtime_error = None
    if gate.input is not None and checker_error is not None:  # deferred: is it the input's failure too?
        input_error = _checker_error(gate.input)
        if input_error is not None:
            gate = _gate_from(gate.input, input_error,
                              _runtime_error(gate.input, custom_ops=gate.custom_ops, optimize=False))
            checker_error = None
    if checker_error is not None:
        raise ValidationError(f"the quantized model fails onnx.checker (the input passes it): {checker_error}")
    note = gate.note
    size = sum(p.stat().st_size for p in Path(path).parent.iterdir() if p.name.startswith(Path(path).name))
    if gate.runtime and gate.checker and size > ORT_PRECHECK_BYTES:
        # onnxruntime holds a model's weights in memory: bounded memory means not loading a large output
        # (a 7B shape's 4 GB int4 output peaked at 3.4 GB in the load alone) where the checker vouches
        note = "; ".join(x for x in (note, f"the output ({size / 2**30:.1f} GiB) was validated by onnx.checker "
                                           f"by path (graph, types, opsets; external data not read), not loaded in "
                                           f"onnxruntime: above {ORT_PRECHECK_BYTES / 2**30:.0f} GiB that load "
                                           f"needs as much memory as the output") if x)
    elif gate.runtime:
        runtime_error = _runtime_error(path, custom_ops=custom_ops)
    if gate.input is not None and runtime_error is not None:
        input_error = _runtime_error(gate.input, custom_ops=gate.custom_ops, optimize=False)
        if input_error is not None:
            gate = _gate_from(gate.input, None, input_error)
            runtime_error = None
    if runtime_error is not None:
        raise ValidationError(f"the quantized model does not load in onnxruntime (the input does): {runtime_error}")
    return Gate(gate.checker, gate.runtime, note)
