"""The one entry point: ``quantize(model_or_path, config)``.

Data flows one way: targets (graph) -> weights (algorithms on quant/) -> nodes (graph emitters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxfgq.algorithms import QuantizedWeight, QuantSpec
from onnxfgq.algorithms.rtn import solve_with_sqnr
from onnxfgq.calibrated import needs_plan, plan_weights, storage_bits_of
from onnxfgq.calibration.feeds import FeedOptions
from onnxfgq.config import OutputFormat, QuantizeConfig, Simplify
from onnxfgq.errors import ModelLoadError, NothingToQuantizeError
from onnxfgq.graph import external, io, passes, sanity
from onnxfgq.graph.emit import make_emitter
from onnxfgq.graph.roles import apply_lm_head
from onnxfgq.graph.spool import Spool
from onnxfgq.graph.targets import Target, find_targets, has_foldable_weights
from onnxfgq.quant import sqnr_db
from onnxfgq.report import LayerReport, Report

ModelLike = str | os.PathLike | ir.Model | onnx.ModelProto
Progress = Callable[[Iterable, int, str], Iterable]

QDQ_OPSET = 21  # blocked DequantizeLinear and int4 types
# MatMulNBits at accuracy_level 0 dequantizes to float; 4 quantizes activations to int8 per block (VNNI
# dot products). Measured in onnxruntime-genai on CPU: docs/BENCHMARKS.md, "Speed defaults".
CPU_SPEED_HINT = ("speed: for onnxruntime on CPU, --target cpu (MatMulNBits accuracy_level 4: int8 activations "
                  "inside the kernel) decoded LLMs about 2x faster than accuracy_level 0 here, at a small accuracy "
                  "cost (docs/BENCHMARKS.md)")
# Measured on the trained test LLM over five calibration draws: docs/BENCHMARKS.md, "Stop 19".
DECODER_SYMMETRIC_HINT = ("decoder: --symmetric writes onnxruntime-genai's own int4 layout (no zero points, "
                          "about 1% smaller, same speed) and was the more accurate choice on the test LLM "
                          "(GPTQ perplexity gap to FP32 0.12 against 0.17 asymmetric; docs/BENCHMARKS.md)")


def _no_progress(items: Iterable, total: int, label: str) -> Iterable:
    del total, label
    return items


@dataclass
class QuantizeResult:
    model: ir.Model
    report: Report = field(default_factory=Report)


def load_model(model: ModelLike) -> ir.Model:
    """An ``ir.Model`` that the caller's object does not share (inputs are never modified)."""
    if isinstance(model, ir.Model):
        # A new graph over the same tensors, external ones checked and bound to an absolute folder.
        copy = model.clone()
        external.bind(copy)
        return copy
    if isinstance(model, onnx.ModelProto):
        # from_proto builds a separate graph; tensors are read from the proto but never written
        copy = ir.from_proto(model)
        if any(True for _ in external.external_slots(copy)):
            raise ModelLoadError("the ModelProto refers to external data but has no folder to read it from: "
                                 "pass the model's path, or load it with its external data")
        return copy
    return io.load(model)


def _describe_block(target: Target, qw: QuantizedWeight) -> str:
    bs = qw.qparams.block_shape
    shape = qw.codes.shape
    red, chan = target.quant_axes
    if all(b >= d for b, d in zip(bs, shape)):
        return "tensor"
    if bs[chan] == 1 and all(b >= d for i, (b, d) in enumerate(zip(bs, shape)) if i != chan):
        return "channel"
    return f"g{bs[red]}"


def quantize(
    model: ModelLike,
    config: QuantizeConfig | None = None,
    *,
    progress: Progress = _no_progress,
) -> QuantizeResult:
    """Quantize the weights of ``model`` as ``config`` says; returns the new model and a report.

    The input (path or object) is never modified. With ``config.activations`` set, this is static
    int8 (weights + activations), calibrated on ``config.activations.calibration``.
    """
    if config is not None and config.activations is not None:
        from onnxfgq.static import open_calibration, quantize_static

        ir_model = load_model(model)
        data, ranges, label = open_calibration(config.activations.calibration, ir_model, config.activations,
                                               feeds=FeedOptions.from_config(config.feeds, _folder_of(model)))
        qmodel, report = quantize_static(ir_model, config, data=data, ranges=ranges, progress=progress,
                                         data_label=label)
        return QuantizeResult(qmodel, report)
    config = _with_model_dir(config or QuantizeConfig(), _folder_of(model))
    return _quantize_model(load_model(model), config, progress)


def _folder_of(model: ModelLike) -> Path | None:
    return Path(model).resolve().parent if isinstance(model, (str, os.PathLike)) else None


def _with_model_dir(config: QuantizeConfig, folder: Path | None) -> QuantizeConfig:
    """Data sources look beside the model (tokenizer, genai_config.json) unless told otherwise."""
    if folder is None or config.feeds.model_dir:
        return config
    return dataclasses.replace(config, feeds=dataclasses.replace(config.feeds, model_dir=str(folder)))


def _quantize_model(ir_model: ir.Model, config: QuantizeConfig, progress: Progress, work=None,
                    spool: Spool | None = None) -> QuantizeResult:
    """Quantize ``ir_model``, which the caller hands over (it may be modified or replaced); ``work``
    (engine/checkpoint.Work) checkpoints an ``--engine blocks`` run; with a ``spool``, new tensors go
    to disk as they are made (the result's initializers then point into the spool's file)."""
    config.validate()
    sanity.check(ir_model)
    started = time.perf_counter()
    config, engine_note = _resolve_engine(config, ir_model)
    report = Report(config=_plain(config))
    if engine_note:
        report.notes.append(engine_note)
    report.notes += sanity.normalize(ir_model)
    if config.simplify is Simplify.ALWAYS or (
        config.simplify is Simplify.AUTO and has_foldable_weights(ir_model.graph, config.selection.op_types)
    ):
        simplified = io.simplify(ir_model)
        ir_model = simplified.model
        report.notes.append(simplified.note)
    if config.rotate:  # before anything reads a weight: calibration then sees the rotated float model
        from onnxfgq.graph import rotate

        report.notes += rotate.apply(ir_model, config.rotate_seed).notes
    wc = config.weights
    fmt = wc.resolved_format()
    if fmt is OutputFormat.MATMULNBITS and wc.accuracy_level != 4:
        report.notes.append(CPU_SPEED_HINT)
    if fmt is OutputFormat.QDQ:
        note = passes.upgrade_opset(ir_model, QDQ_OPSET)
        if note:
            report.notes.append(note)
    if fmt is OutputFormat.CUSTOM and wc.format is OutputFormat.AUTO:
        problem = wc.matmulnbits_problem()
        reason = problem[1].split(";")[0] if problem else ""
        report.notes.append(f"using the custom op com.onnxfgq::MatMulBlockQuant ({reason})")

    targets = list(find_targets(ir_model, config.selection))
    roles = apply_lm_head(ir_model.graph, targets, config.selection, wc)  # --lm-head: float or 8 bits
    report.notes.extend(roles.notes)
    if roles.lm_head is not None and fmt is OutputFormat.MATMULNBITS and not wc.symmetric and wc.bits == 4:
        report.notes.append(DECODER_SYMMETRIC_HINT)
    emitter = make_emitter(ir_model, wc, spool)
    for t in targets:
        if t.skip_reason is None:
            t.skip_reason = emitter.can_emit(t)
    # Tables first, so that a tied output projection can reuse the table's storage (see emit.py).
    todo = sorted((t for t in targets if t.skip_reason is None), key=lambda t: t.kind != "gather")
    if not todo:
        reasons = sorted({t.skip_reason for t in targets if t.skip_reason})
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        raise NothingToQuantizeError(
            f"nothing to quantize: no {'/'.join(config.selection.op_types)} node with a constant float "
            f"weight matches the selection{detail}"
        )

    plan = None
    # Calibration observes main-graph tensors only: weights in control-flow bodies and functions get RTN.
    reachable = [t for t in todo if t.scope == "graph"]
    if needs_plan(wc) and len(reachable) < len(todo):
        report.notes.append(f"{len(todo) - len(reachable)} weights inside control-flow bodies or functions "
                            f"use RTN: calibration cannot observe their inputs")
    if needs_plan(wc) and reachable:  # calibration, AWQ graph edits, per-weight layouts and solvers
        plan = plan_weights(ir_model, reachable, wc, fmt, progress, FeedOptions.from_config(config.feeds), work)
        report.notes.extend(plan.notes)
        for t in todo:
            if id(t.node) in roles.bits and plan.covers(t):
                p = plan.weights[_key(t)]
                p.spec = dataclasses.replace(p.spec, bits=roles.bits_for(t, wc.bits))

    # A shared weight is solved once; its codes are dropped after its last user (bounded memory).
    solved: dict[tuple, QuantizedWeight | None] = {}
    weight_sqnr: dict[tuple, float] = {}
    uses = Counter(_key(t) for t in todo)
    for t in targets:
        if t.skip_reason is not None:
            report.layers.append(_layer(t, "skipped", reason=t.skip_reason))

    def rtn(t: Target) -> tuple[QuantizedWeight | None, float | str]:
        w = t.weight()
        bad = _nonfinite(w)
        if bad:
            return None, bad
        red, chan = t.quant_axes
        bits = roles.bits_for(t, wc.bits)
        return solve_with_sqnr(w, QuantSpec(bits, wc.block_shape(w.shape, red, chan), wc.symmetric))

    # Plain solves of distinct weights run ahead on a small thread pool (numpy releases the GIL);
    # graph edits stay on this thread, in order.
    distinct = {_key(t): t for t in reversed(todo)}
    plain = [t for t in todo if distinct[_key(t)] is t and not (plan is not None and plan.covers(t))]
    ahead = _run_ahead(rtn, plain)
    refused: dict[tuple, str] = {}  # weights holding NaN/Inf stay float, with the reason
    for t in progress(todo, len(todo), "quantizing"):
        key = _key(t)
        shared = key in solved
        planned = plan is not None and plan.covers(t)
        if not shared and planned:
            w = t.weight()
            bad = _nonfinite(w)
            if bad:
                refused[key], solved[key] = bad, None
            else:
                solved[key] = qw = plan.solve(t, w)
                weight_sqnr[key] = sqnr_db(w, plan.effective(t, qw))
        elif not shared:
            solved[key], weight_sqnr[key] = next(ahead)
            if solved[key] is None:
                refused[key] = weight_sqnr.pop(key)
        if key in refused:
            report.layers.append(_layer(t, "skipped", reason=refused[key]))
            continue
        qw = solved[key]
        nbytes = emitter.emit(t, qw)
        layer = _layer(t, "shared" if shared else "quantized", bits=qw.bits,
                       block=_describe_block(t, qw), fmt=fmt.value,
                       algorithm=wc.algorithm.value if planned else "rtn")
        layer.sqnr_db = weight_sqnr[key]
        if planned:
            err = plan.output_error(t, t.weight(), qw)
            layer.output_sqnr_db = None if err is None else float(-10 * np.log10(max(err, 1e-30)))
            layer.detail = "; ".join(x for x in (plan.weights[key].awq_note, qw.note) if x)
        if not shared and t.kind == "matmul":
            layer.weight_bits = storage_bits_of(t, qw, fmt)
        layer.bytes_before = 0 if shared else int(t.chain.tensor.nbytes)
        layer.bytes_after = nbytes
        report.layers.append(layer)
        uses[key] -= 1
        if uses[key] == 0:
            solved[key] = None  # keeps `key in solved` meaning "seen" while freeing the codes
        del qw
    passes.remove_unused(ir_model)
    sanity.unique_node_names(ir_model)  # emitted names derive from node names
    report.seconds = time.perf_counter() - started
    return QuantizeResult(ir_model, report)


def _nonfinite(w: np.ndarray) -> str | None:
    """Why a weight cannot be quantized honestly (NaN/Inf values), or None."""
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    return f"weight has {bad} non-finite values (NaN/Inf): kept float" if bad else None


def _key(t: Target) -> tuple:
    """Identifies the weight tensor (and orientation) a target reads: equal keys share a solve."""
    return t.chain.key + (t.transposed,)


def _run_ahead(fn: Callable, items: list, workers: int = 2, window: int = 3) -> Iterator:
    """``fn(item)`` for each item, in order, computed up to ``window`` items ahead on threads."""
    if len(items) <= 1 or (os.cpu_count() or 1) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in islice(it, window):
            pending.append(pool.submit(fn, item))
        while pending:
            result = pending.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield result


_END = object()


def _layer(t: Target, status: str, *, reason: str = "", bits: int = 0, block: str = "",
           fmt: str = "", algorithm: str = "") -> LayerReport:
    shape = tuple(int(d) for d in t.weight_shape)
    return LayerReport(t.name, t.node.op_type, shape, status, reason or "", bits, block, fmt, algorithm)


def _plain(config: QuantizeConfig) -> dict:
    import json

    return json.loads(config.to_json())


def quantize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    config: QuantizeConfig | None = None,
    *,
    progress: Progress = _no_progress,
    external: bool | None = None,
    resume: bool = False,
    work_dir: str | os.PathLike | None = None,
) -> Report:
    """Quantize a model file into ``output_path``: written atomically, checked with onnx.checker and
    loaded in onnxruntime before it appears; the input file is never touched.

    A calibrated ``engine="blocks"`` run checkpoints each finished block in ``work_dir`` (default
    ``OUTPUT.onnxfgq-work`` beside ``output_path``), removed once the output is written; ``resume``
    continues an interrupted run from it, with the same output bytes (engine/checkpoint.py).

    An export folder (genai_config.json / config.json beside the model) is quantized into the folder
    ``output_path`` that its client runs as is (see ``onnxfgq.folders``)."""
    if Path(input_path).is_dir():
        from onnxfgq.folders import quantize_folder

        return quantize_folder(Path(input_path), Path(output_path), config, progress=progress, external=external)
    input_path, output_path = Path(input_path), Path(output_path)
    source = io.load(input_path)
    input_files = [input_path, *io.external_inputs(source)]
    io.check_output_path(output_path, input_files)
    config = _with_model_dir(config or QuantizeConfig(), input_path.resolve().parent)
    custom = config.weights.resolved_format() is OutputFormat.CUSTOM
    # Before long (calibrated) work, refuse what cannot be validated; a run of seconds checks the input
    # only where the output fails a check.
    gate = io.input_gate(input_path, source, defer=not needs_plan(config.weights))
    if custom:  # the output can only be validated with the library: a missing one fails now, not at the end
        from onnxfgq import ops

        ops.library_path()
    work = _work_folder(input_files, output_path, config, resume, work_dir, source)
    if external is None and len(input_files) > 1:
        external = True
    # An output with external data is streamed: each quantized tensor goes to a spool file beside the
    # output as it is made, and the save copies it over in chunks (memory: one weight, not the model).
    spool = Spool.beside(output_path) if external else None
    try:
        result = _quantize_model(source, config, progress, work, spool)
        started = time.perf_counter()
        applied: list[io.Gate] = []
        written = io.save(result.model, output_path, external=external,
                          validate=lambda p: applied.append(io.check(p, custom_ops=custom, gate=gate)))
        if applied[0].note:
            result.report.notes.append(applied[0].note)
    except BaseException:
        if work is not None:
            work.abandon()
        raise
    finally:
        if spool is not None:
            spool.close()
    if work is not None:
        work.remove()
    report = result.report
    report.seconds += time.perf_counter() - started
    report.input_path, report.output_path = str(input_path), str(output_path)
    report.size_before = _file_sizes(input_files)
    report.size_after = _file_sizes(written)
    return report


def _resolve_engine(config: QuantizeConfig, model: ir.Model) -> tuple[QuantizeConfig, str]:
    """``config`` with ``--engine auto`` decided for ``model`` (calibrated runs), and a note saying so."""
    wc = config.weights
    if wc.engine != "auto":
        return config, ""
    n = io.weight_bytes(model)
    engine = wc.resolved_engine(n)
    config = dataclasses.replace(config, weights=dataclasses.replace(wc, engine=engine))
    if not (wc.calibration and needs_plan(wc)):
        return config, ""
    size = f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    why = "--gptaq needs it" if wc.gptaq else f"{size} of weights, {'over' if engine == 'blocks' else 'within'} 2 GiB"
    return config, f"--engine auto: calibrated {'block by block' if engine == 'blocks' else 'on the whole model'} ({why})"


def _work_folder(input_files: list[Path], output_path: Path, config: QuantizeConfig, resume: bool,
                 work_dir: str | os.PathLike | None, model: ir.Model):
    """The checkpoint folder of a resumable run (calibrated, --engine blocks), checked now."""
    from onnxfgq.config import ConfigError
    from onnxfgq.engine.checkpoint import Work, identity_of, work_folder_for

    config, _ = _resolve_engine(config, model)
    wc = config.weights
    if not (wc.engine == "blocks" and wc.calibration and needs_plan(wc)):
        if resume:
            raise ConfigError("--resume", "only a calibrated --engine blocks run is checkpointed; nothing to resume")
        return None
    plain = _plain(config)
    plain.get("weights", {}).pop("executor", None)  # where solves run does not change the output
    work = Work(Path(work_dir) if work_dir else work_folder_for(output_path),
                identity_of(input_files, json.dumps(plain)), resume=resume)
    work.check()
    return work


def _file_sizes(paths: Iterable[Path]) -> int:
    return sum(Path(p).stat().st_size for p in paths)


__all__ = ["QuantizeResult", "load_model", "quantize", "quantize_file"]
