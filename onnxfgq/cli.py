"""``onnxfgq`` command line. Every default comes from the config dataclasses (the API's defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from pathlib import Path

from onnxfgq.config import (
    ActivationConfig,
    ActivationType,
    Algorithm,
    ConfigError,
    FeedConfig,
    Granularity,
    LMHead,
    ObserverKind,
    OutputFormat,
    QuantizeConfig,
    Selection,
    Simplify,
    WeightConfig,
)
from onnxfgq.errors import OnnxfgqError

_W = WeightConfig()
_S = Selection()
_A = ActivationConfig()


def _console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 160  # logs and pipes: don't fold the layer table into 80 columns
    return console


def rich_progress(items: Iterable, total: int, label: str) -> Iterable:
    """A progress bar on stderr over ``items`` (silent when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total or None)
        for item in items:
            yield item
            bar.advance(task)


def _dims(values: list[str]) -> dict[str, int]:
    dims = {}
    for v in values:
        name, sep, num = v.partition("=")
        if not sep or not num.isdigit():
            raise ConfigError("--dim", f"expected NAME=INT, got {v!r}")
        dims[name] = int(num)
    return dims


def _add_data_args(p: argparse.ArgumentParser, default_samples: int) -> None:
    p.add_argument("--eval-data", default="random", metavar="SRC",
                   help="inputs for the accuracy report: 'random', 'text:FILE', or a folder of .npy/.npz "
                        "(default: random)")
    p.add_argument("--eval-samples", type=int, default=default_samples, help="samples to evaluate on")
    p.add_argument("--batch-size", type=int, default=8, help="batch size of evaluation inputs")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder for text:FILE (default: FILE's folder)")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                   help="value of a symbolic input dimension for random inputs (repeatable)")


def _add_lm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("causal language models")
    g.add_argument("--perplexity", metavar="text:FILE",
                   help="evaluate as a causal LM instead of comparing outputs: perplexity over windows of FILE "
                        "and next-token top-1 agreement with the float model")
    g.add_argument("--lm-window", type=int, default=128, metavar="TOKENS", help="tokens per window (128)")
    g.add_argument("--lm-max-windows", type=int, default=64, metavar="N", help="windows evaluated, 0 = all (64)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onnxfgq", description="Fine-grained post-training quantization of ONNX models.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize the weights of MatMul/Gemm (and more) nodes")
    q.add_argument("model", type=Path, help="an .onnx file, or an export folder (genai_config.json / config.json)")
    q.add_argument("-o", "--output", type=Path,
                   help="output path (default: MODEL.<bits>bit.onnx beside it; a folder in: FOLDER.<bits>bit)")
    q.add_argument("--bits", type=int, default=_W.bits)
    q.add_argument("--block-size", type=int, default=_W.block_size,
                   help=f"group size along the reduction axis (default {_W.block_size}); 0 means per-channel")
    q.add_argument("--granularity", choices=[g.value for g in Granularity], default=None,
                   help="tensor, channel or group (default: group, or channel with --block-size 0)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="zero point fixed at mid-range (default: asymmetric, fitted per block)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false")
    q.add_argument("--format", choices=[f.value for f in OutputFormat], default=_W.format.value)
    q.add_argument("--algo", choices=[a.value for a in Algorithm], default=_W.algorithm.value)
    q.add_argument("--accuracy-level", type=int, default=None,
                   help=f"MatMulNBits accuracy_level (default {_W.accuracy_level}; 4 with --target cpu)")
    q.add_argument("--target", choices=sorted(TARGETS), default=None,
                   help="tune for a runtime: 'cpu' = MatMulNBits accuracy_level 4 (int8 activations: about 2x "
                        "the decode speed of level 0 in onnxruntime-genai on CPU, as fast as the builder's int4); "
                        "an explicit --accuracy-level still wins")
    q.add_argument("--op-types", default=",".join(_S.op_types), help="comma-separated op types to quantize")
    q.add_argument("--include", action="append", default=[], metavar="REGEX", help="only nodes whose name matches")
    q.add_argument("--exclude", action="append", default=[], metavar="REGEX", help="skip nodes whose name matches")
    q.add_argument("--min-elements", type=int, default=_S.min_elements, help="weights smaller than this stay float")
    q.add_argument("--quantize-embeddings", action="store_true", default=_S.quantize_embeddings,
                   help="also quantize Gather tables (GatherBlockQuantized / DequantizeLinear)")
    q.add_argument("--lm-head", choices=[m.value for m in LMHead], default=_S.lm_head.value,
                   help="a language model's output projection (found by role, whatever its name): quantized "
                        "like the rest (same), at 8 bits (8), left in float (float), or auto: 8 bits with "
                        f"--target cpu, else same (an 8-bit MatMulNBits is slow at accuracy_level 0); "
                        f"default {_S.lm_head.value}")
    q.add_argument("--simplify", choices=[v.value for v in Simplify], default=QuantizeConfig().simplify.value,
                   help="onnxsim first: auto runs it only when a weight is computed from constants")
    q.add_argument("--external-data", choices=["auto", "always", "never"], default="auto")
    q.add_argument("--report", type=Path, metavar="OUT.json", help="write the report as JSON")
    q.add_argument("--no-eval", action="store_true", help="skip the accuracy comparison")
    c = q.add_argument_group("calibrated weight algorithms (GPTQ, AWQ, clipping, adaptive, mixed precision)")
    c.add_argument("--calibration", default=_W.calibration or None, metavar="SRC",
                   help="calibration data: 'text:FILE', a folder of .npy/.npz, or 'random' (needed by gptq/awq)")
    c.add_argument("--calib-samples", type=int, default=_W.calibration_samples, help="calibration samples")
    c.add_argument("--calib-batch-size", type=int, default=_W.calibration_batch_size,
                   help="batch size of calibration inputs")
    c.add_argument("--max-error", default=None, metavar="BUDGET",
                   help="--granularity adaptive: per-layer error budget, a relative error (e.g. 0.01) or "
                        f"sqnr:DB (default {_W.max_error}); output error with --calibration, else weight error")
    c.add_argument("--target-bits", type=float, default=_W.target_bits or None, metavar="BITS",
                   help="mixed precision: choose 4 or 8 bits per layer (and the block, if adaptive) for at "
                        "most this average of stored bits per weight, scales and zero points included")
    c.add_argument("--gptq-damp", type=float, default=_W.gptq_damp, help="GPTQ dampening (fraction of mean diag H)")
    c.add_argument("--no-act-order", dest="act_order", action="store_false", default=_W.gptq_act_order,
                   help="GPTQ: process rows in their order instead of by decreasing salience")
    c.add_argument("--sequential", dest="sequential", action="store_true", default=_W.gptq_sequential,
                   help="GPTQ: re-collect later layers' inputs from the partly quantized model (one calibration "
                        "pass per few layers) instead of taking every input from the float model")
    c.add_argument("--engine", choices=["whole", "blocks"], default=_W.engine,
                   help="calibration: run the whole model at once, or block by block (the graph cut at its "
                        "residual stream; each block calibrated on the quantized blocks' outputs, memory "
                        "bounded by one block)")
    _add_data_args(q, default_samples=8)
    _add_lm_args(q)
    q.set_defaults(func=cmd_quantize)
    _add_static_args(q)

    i = sub.add_parser("inspect", help="list the weights a quantize run would touch")
    i.add_argument("model", type=Path)
    i.add_argument("--op-types", default=",".join(_S.op_types))
    i.add_argument("--quantize-embeddings", action="store_true")
    i.add_argument("--simplify", choices=[v.value for v in Simplify], default=QuantizeConfig().simplify.value,
                   help="as quantize does: onnxsim first (auto: only when a weight is computed from constants)")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("eval", help="compare a quantized model's outputs with the float model's")
    e.add_argument("reference", type=Path)
    e.add_argument("candidate", type=Path)
    _add_data_args(e, default_samples=32)
    _add_lm_args(e)
    e.set_defaults(func=cmd_eval)
    _add_calibrate_parser(sub)
    return ap


def config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    granularity = args.granularity
    if granularity is None:
        granularity = "channel" if args.block_size == 0 else "group"
    elif args.block_size == 0 and granularity == "group":
        raise ConfigError("--block-size", "0 means per-channel; it cannot go with --granularity group")
    weights = WeightConfig(
        bits=args.bits, granularity=Granularity(granularity), block_size=args.block_size or _W.block_size,
        symmetric=_target_value(args, "symmetric"), algorithm=Algorithm(args.algo), format=OutputFormat(args.format),
        accuracy_level=_target_value(args, "accuracy_level"), **_calibrated_args(args),
    )
    op_types = tuple(t.strip() for t in args.op_types.split(",") if t.strip())
    if not op_types:
        raise ConfigError("--op-types", "needs at least one op type")
    selection = Selection(op_types=op_types, include=tuple(args.include), exclude=tuple(args.exclude),
                          min_elements=args.min_elements, quantize_embeddings=args.quantize_embeddings,
                          lm_head=LMHead(args.lm_head))
    _check_regexes(selection)
    config = QuantizeConfig(weights=weights, selection=selection, simplify=Simplify(args.simplify),
                            feeds=FeedConfig(tokenizer=str(args.tokenizer or ""), dims=_dims(args.dim)))
    if getattr(args, "activations", None):
        config = dataclasses.replace(config, activations=activation_config_from_args(args))
    config.validate()
    return config


# --target presets: WeightConfig fields the named runtime is fastest with (measured in docs/BENCHMARKS.md,
# "Speed defaults"); an explicit flag overrides its field.
# Symmetric is not part of "cpu": it decoded no faster and lost accuracy (MiniLM cosine -0.013, test-LLM
# perplexity +0.4); accuracy_level 4 costs <= 0.0005 cosine.
TARGETS = {"cpu": {"accuracy_level": 4}}


def _target_value(args: argparse.Namespace, name: str):
    value = getattr(args, name, None)
    if value is not None:
        return value
    preset = TARGETS.get(getattr(args, "target", None) or "", {})
    return preset.get(name, getattr(_W, name))


def _weight_error_budget(text: str) -> float:
    """'0.01' (relative error) or 'sqnr:20' (dB; 20 dB is 0.01)."""
    metric, sep, value = text.strip().lower().rpartition(":")
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if number < 0 or (sep and metric != "sqnr"):
        raise ConfigError("--max-error", f"expected a relative error like 0.01 or sqnr:DB, got {text!r}")
    return 10 ** (-number / 10) if sep else number


def _calibrated_args(args: argparse.Namespace) -> dict:
    """WeightConfig fields of the calibrated algorithms (absent attributes keep the defaults)."""
    out: dict = {}
    if getattr(args, "calibration", None):
        out["calibration"] = args.calibration
    for name, field_ in (("calib_samples", "calibration_samples"), ("calib_batch_size", "calibration_batch_size"),
                         ("gptq_damp", "gptq_damp"), ("act_order", "gptq_act_order"), ("sequential", "gptq_sequential"),
                         ("target_bits", "target_bits"), ("engine", "engine")):
        if getattr(args, name, None) is not None:
            out[field_] = getattr(args, name)
    if getattr(args, "max_error", None) is not None and args.granularity == Granularity.ADAPTIVE.value:
        out["max_error"] = _weight_error_budget(args.max_error)
    return out


def _check_regexes(selection: Selection) -> None:
    import re

    for opt, patterns in (("--include", selection.include), ("--exclude", selection.exclude)):
        for p in patterns:
            try:
                re.compile(p)
            except re.error as exc:
                raise ConfigError(opt, f"bad regular expression {p!r}: {exc}") from None


def _default_output(model: Path, config: QuantizeConfig) -> Path:
    return model.with_name(f"{model.stem}.{config.weights.bits}bit.onnx")


def _open_eval(reference: Path, args):
    """The --eval-data reader on the reference model: the same source-opening function (and --dim,
    --tokenizer, the model's folder) as calibration. Opened before any long work to check it."""
    from onnxfgq.calibration.feeds import FeedOptions
    from onnxfgq.calibration.sources import open_source
    from onnxfgq.graph import io

    if args.eval_samples < 1:
        raise ConfigError("--eval-samples", f"must be >= 1, got {args.eval_samples}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
    reference = _model_file(reference)
    options = FeedOptions(dims=_dims(args.dim), tokenizer=args.tokenizer, model_dir=Path(reference).resolve().parent)
    return open_source(args.eval_data, io.load(reference), num_samples=args.eval_samples,
                       batch_size=args.batch_size, options=options, option="--eval-data")


def _evaluate(reference: Path, candidate: Path, args, custom_ops: bool):
    from onnxfgq.evaluate import compare
    from onnxfgq.report import Accuracy

    reader = getattr(args, "eval_reader", None) or _open_eval(reference, args)
    batch = getattr(reader, "fixed_batch", None) or args.batch_size
    total = -(-len(reader) // batch) if hasattr(reader, "__len__") else 0
    metrics, n = compare(reference, candidate, reader, custom_ops=custom_ops, progress=rich_progress, total=total)
    how = getattr(reader, "description", "")
    return Accuracy(f"{args.eval_data} ({how})" if how else args.eval_data, n, metrics)


def cmd_quantize(args) -> int:
    from onnxfgq.api import quantize_file

    config = config_from_args(args)
    if not args.no_eval and not getattr(args, "perplexity", None):
        args.eval_reader = _open_eval(args.model, args)  # a bad --eval-data fails now, not after the work
    if config.activations is not None:
        return _cmd_quantize_static(args, config)
    _dims(args.dim)  # validate before the long part
    _check_lm_args(args)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    if args.model.is_dir():
        return _quantize_folder(args, config, external)
    out = args.output or _default_output(args.model, config)
    _check_outputs(args, out)
    from onnxfgq.graph import io

    with io.Staged(out) as staged:  # moved into place only after the evaluation and the report
        report = quantize_file(args.model, staged.path, config, progress=rich_progress, external=external)
        return _finish(args, report, staged, custom_ops=config.weights.resolved_format() is OutputFormat.CUSTOM)


def _check_outputs(args, out: Path) -> None:
    """The output and report paths, checked before any work."""
    from onnxfgq.graph import io

    model = io.load(args.model)
    io.check_output_path(out, [args.model, *io.external_inputs(model)])
    if args.report:
        io.check_writable(args.report, "--report")
        if args.report.absolute() in (out.absolute(), args.model.absolute()):
            raise ConfigError("--report", f"{args.report} is the model or the output; give another path")


def _quantize_folder(args, config: QuantizeConfig, external: bool | None) -> int:
    """Folder mode (see onnxfgq.folders): the report and evaluation then use the model files."""
    from onnxfgq import folders
    from onnxfgq.api import quantize_file
    from onnxfgq.graph import io

    folder = folders.open_folder(args.model)
    out = Path(args.output or folders.default_output(args.model, config.weights.bits))
    folders.check_output_folder(folder, out)
    if args.report:
        io.check_writable(args.report, "--report")
    args.model, args.tokenizer = folder.model, args.tokenizer or folder.tokenizer
    # Evaluated inside the staged folder; the folder appears only after the report succeeded.
    with folders.StagedFolder(folder, out) as staged:
        report = quantize_file(folder.model, staged.path, config, progress=rich_progress, external=external)
        folders.annotate(report, folder, out)
        return _finish(args, report, staged, custom_ops=config.weights.resolved_format() is OutputFormat.CUSTOM)


def _finish(args, report, out, *, custom_ops: bool) -> int:
    """Accuracy against FP32 (unless --no-eval), the printed report, and --report JSON.

    ``out`` is the written output, or an ``io.Staged`` one: that is evaluated where it is and moved into
    place (with the report) only when everything else succeeded, so a failure leaves nothing behind."""
    from onnxfgq.graph import io

    if isinstance(out, io.Staged):
        report.output_path = str(out.out)
        return _finish_staged(args, report, out, custom_ops=custom_ops)
    return _finish_written(args, report, out, custom_ops=custom_ops)


class EvaluationError(OnnxfgqError):
    """The accuracy report could not be computed."""


def _one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__


def _finish_staged(args, report, staged, *, custom_ops: bool) -> int:
    import os

    from onnxfgq.graph.io import pause_point
    from onnxfgq.report import render

    if not args.no_eval:
        evaluate = _evaluate_lm if getattr(args, "perplexity", None) else _evaluate
        try:
            report.accuracy = evaluate(args.model, staged.path, args, custom_ops)
        except (OnnxfgqError, ConfigError):
            raise
        except Exception as exc:  # onnxruntime refusing the feeds, a model it cannot run, ...
            if args.debug:
                raise
            raise EvaluationError(f"the accuracy report failed, so nothing was written (--no-eval skips it): "
                                  f"{type(exc).__name__}: {_one_line(exc)}") from exc
    console = _console()
    render(report, console)
    pause_point("commit")
    pending = None
    try:
        if args.report:
            pending = args.report.with_name(f".{args.report.name}.onnxfgq-partial")
            pending.write_text(report.to_json())
        staged.commit()
        if pending is not None:
            os.replace(pending, args.report)
            pending = None
    finally:
        if pending is not None:
            pending.unlink(missing_ok=True)
    console.print(f"wrote {staged.out}")
    return 0


def _finish_written(args, report, out: Path, *, custom_ops: bool) -> int:
    from onnxfgq.report import render

    if not args.no_eval:
        evaluate = _evaluate_lm if getattr(args, "perplexity", None) else _evaluate
        report.accuracy = evaluate(args.model, out, args, custom_ops)
    console = _console()
    render(report, console)
    console.print(f"wrote {out}")
    if args.report:
        args.report.write_text(report.to_json())
    return 0


def cmd_inspect(args) -> int:
    from rich.table import Table

    from onnxfgq.graph import io, sanity
    from onnxfgq.graph.targets import find_targets, has_foldable_weights

    model = io.load(args.model)
    sel = Selection(op_types=tuple(args.op_types.split(",")), quantize_embeddings=args.quantize_embeddings)
    # The graph quantize sees: same checks, same normalisation, same simplification rule.
    sanity.check(model)
    notes = sanity.normalize(model)
    simplify = Simplify(args.simplify)
    if simplify is Simplify.ALWAYS or (simplify is Simplify.AUTO and has_foldable_weights(model.graph, sel.op_types)):
        result = io.simplify(model)
        model = result.model
        notes.append(result.note)
    table = Table(title=str(args.model))
    for col in ("node", "op", "weight shape", "dtype", "quantizable"):
        table.add_column(col)
    n = 0
    for t in find_targets(model, sel):
        n += t.skip_reason is None
        table.add_row(t.name, t.node.op_type, "x".join(map(str, t.weight_shape)), t.chain.tensor.dtype.name,
                      "yes" if t.skip_reason is None else t.skip_reason)
    console = _console()
    console.print(table)
    for note in notes:
        console.print(f"note: {note}")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in model.opset_imports.items())
    console.print(f"{n} quantizable weights; {len(model.graph)} nodes; opsets {opsets}")
    return 0


def _evaluate_lm(reference: Path, candidate: Path, args, custom_ops: bool):
    """--perplexity text:FILE: perplexity of both models and the candidate's next-token agreement."""
    from onnxfgq import lm_eval
    from onnxfgq.report import Accuracy

    text = _check_lm_args(args)
    windows = lm_eval.text_windows(text, args.tokenizer, args.lm_window, args.lm_max_windows,
                                   model_dir=reference if Path(reference).is_dir() else Path(reference).parent)
    result = lm_eval.evaluate({"reference": reference, "candidate": candidate}, windows,
                              batch_size=args.batch_size, custom_ops=custom_ops, progress=rich_progress)
    return Accuracy(f"{args.perplexity} ({result.windows} windows of {result.length} tokens)",
                    result.windows, result.metrics())


def _check_lm_args(args) -> Path | None:
    """The --perplexity text file, checked before any long work (None without --perplexity)."""
    from onnxfgq import lm_eval

    if not getattr(args, "perplexity", None):
        return None
    if args.lm_window < 2:
        raise ConfigError("--lm-window", f"a window needs at least 2 tokens, got {args.lm_window}")
    if args.lm_max_windows < 0:
        raise ConfigError("--lm-max-windows", f"must be >= 0 (0 = all), got {args.lm_max_windows}")
    text = lm_eval.parse_spec(args.perplexity)
    if not text.is_file():
        raise lm_eval.LMEvalError(f"--perplexity: {text}: no such text file")
    return text


def _model_file(path: Path) -> Path:
    """An export folder stands for the model file its client loads."""
    if Path(path).is_dir():
        from onnxfgq import folders

        return folders.open_folder(path).model
    return path


def cmd_eval(args) -> int:
    args.reference, args.candidate = _model_file(args.reference), _model_file(args.candidate)
    custom = _uses_custom_ops(args.candidate)
    acc = (_evaluate_lm if args.perplexity else _evaluate)(args.reference, args.candidate, args, custom)
    from onnxfgq.report import format_metrics, nonfinite_note

    console = _console()
    console.print(f"{args.candidate} vs {args.reference} on {acc.samples} samples of {acc.data}: "
                  f"{format_metrics(acc.metrics)}")
    if nonfinite_note(acc.metrics):
        console.print(f"warning: {nonfinite_note(acc.metrics)}")
    return 0


def _uses_custom_ops(path: Path) -> bool:
    from onnxfgq.graph import io

    return any(d == "com.onnxfgq" for d in io.load(path).opset_imports)


def _add_static_args(q: argparse.ArgumentParser) -> None:
    """Static int8 (weights + activations) options of ``quantize``. The calibration options are shared
    with the calibrated weight-only algorithms: whichever adds them first defines them."""
    g = q.add_argument_group("static int8: weights and activations (QDQ)")
    g.add_argument("--activations", choices=[t.value for t in ActivationType], default=None,
                   help="quantize activations too (static QDQ with per-channel int8 weights)")
    _add_observer_args(g)
    g.add_argument("--activation-symmetric", action="store_true", default=_A.symmetric,
                   help="symmetric activation ranges (default: asymmetric)")
    for flags, kw in (
        (("--calibration",), dict(default=None, metavar="SRC|ranges.json",
                                  help="calibration data source, or a ranges.json from 'onnxfgq calibrate'")),
        (("--calib-samples",), dict(type=int, default=None, help="calibration samples")),
        (("--calib-batch-size",), dict(type=int, default=None, help="calibration batch size")),
        (("--max-error",), dict(default=None, metavar="BUDGET",
                                help=f"static: output budget vs FP32 on calibration data, cosine:X, sqnr:DB or "
                                     f"none (default {_A.max_error})")),
    ):
        try:
            g.add_argument(*flags, **kw)
        except argparse.ArgumentError:
            pass  # already defined by the calibrated weight-only options; static mode reads the same value


def _add_observer_args(p) -> None:
    p.add_argument("--observer", choices=[o.value for o in ObserverKind], default=_A.observer.value,
                   help=f"activation range observer (default {_A.observer.value})")
    p.add_argument("--percentile", type=float, default=_A.percentile, help="percentile observer's percentile")


def activation_config_from_args(args: argparse.Namespace) -> ActivationConfig:
    """ActivationConfig from ``quantize --activations`` or ``calibrate`` flags (unset ones: defaults)."""
    def given(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    max_error = getattr(args, "max_error", None)
    act = ActivationConfig(
        dtype=ActivationType(given("activations", _A.dtype.value)),
        symmetric=given("activation_symmetric", _A.symmetric),
        observer=ObserverKind(given("observer", _A.observer.value)),
        percentile=given("percentile", _A.percentile),
        calibration=given("calibration", None) or given("data", None) or _A.calibration,
        num_samples=given("calib_samples", _A.num_samples),
        batch_size=given("calib_batch_size", _A.batch_size),
        max_error=str(max_error) if max_error is not None else _A.max_error,
    )
    act.validate()
    return act


def _cmd_quantize_static(args, config: QuantizeConfig) -> int:
    from onnxfgq.static import quantize_static_file

    _dims(args.dim)
    out = args.output or args.model.with_name(f"{args.model.stem}.{config.activations.dtype.value}.onnx")
    _check_outputs(args, out)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    from onnxfgq.graph import io

    with io.Staged(out) as staged:  # moved into place only after the evaluation and the report
        report = quantize_static_file(args.model, staged.path, config, progress=rich_progress, external=external,
                                      tokenizer=args.tokenizer, dims=_dims(args.dim))
        return _finish(args, report, staged, custom_ops=False)


def cmd_calibrate(args) -> int:
    from onnxfgq.config import Simplify
    from onnxfgq.graph import io
    from onnxfgq.static import calibrate_file

    act = activation_config_from_args(args)
    io.check_writable(args.output, "-o")
    ranges = calibrate_file(args.model, args.output, act, progress=rich_progress, tokenizer=args.tokenizer,
                            dims=_dims(args.dim), simplify=Simplify.NEVER if args.no_simplify else Simplify.AUTO)
    _console().print(f"wrote {args.output}: ranges of {len(ranges.ranges)} tensors from {ranges.samples} samples "
                     f"of {args.data} ({ranges.observer} observer)")
    return 0


def _add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="collect activation ranges for static quantization (ranges.json)")
    c.add_argument("model", type=Path)
    c.add_argument("--data", required=True, metavar="SRC",
                   help="'random', 'text:FILE', 'images:DIR' or a folder of .npy/.npz files")
    c.add_argument("-o", "--output", type=Path, default=Path("ranges.json"), help="ranges file to write")
    c.add_argument("--calib-samples", type=int, default=_A.num_samples, help="calibration samples")
    c.add_argument("--calib-batch-size", type=int, default=_A.batch_size, help="calibration batch size")
    _add_observer_args(c)
    c.add_argument("--tokenizer", type=Path, help="tokenizer folder for text:FILE (default: FILE's folder)")
    c.add_argument("--dim", action="append", default=[], metavar="NAME=INT",
                   help="value of a symbolic input dimension for random inputs (repeatable)")
    c.add_argument("--no-simplify", action="store_true", help="skip onnxsim (must match the quantize run)")
    c.set_defaults(func=cmd_calibrate)


def _raise_interrupted(signum, frame) -> None:
    del frame
    from onnxfgq.errors import Interrupted

    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM and SIGINT become exceptions, so every temporary folder's `finally` runs (no leftovers).
    import signal

    from onnxfgq.errors import Interrupted

    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except (Interrupted, KeyboardInterrupt) as exc:
        if debug:
            raise
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        print(f"onnxfgq: {'interrupted' if code == 130 else 'terminated'}; nothing was written", file=sys.stderr)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _main(argv: list[str] | None) -> int:
    from onnxfgq.graph.io import pause_point

    pause_point("startup")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OnnxfgqError, ConfigError) as exc:
        if args.debug:
            raise
        print(f"onnxfgq: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from onnxfgq.ops import OpsLibraryError

        # onnxruntime refusing a model or its feeds (eval of models with different inputs, a reference
        # it cannot run) is about the inputs, not a bug of ours: one line, like every other such error.
        from_ort = type(exc).__module__.startswith("onnxruntime")
        if args.debug or not (isinstance(exc, OpsLibraryError) or from_ort):
            raise
        print(f"onnxfgq: error: {'onnxruntime: ' if from_ort else ''}{_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
