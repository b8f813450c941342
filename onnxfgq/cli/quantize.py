"""``onnxfgq quantize``: weight-only, folder mode and static int8, each written through a staged output."""

from __future__ import annotations

from pathlib import Path

from onnxfgq.cli.args import config_from_args, parse_dims
from onnxfgq.cli.console import make_console, one_line, rich_progress
from onnxfgq.cli.evaluate import check_lm_args, evaluate_lm, evaluate_outputs, open_eval
from onnxfgq.config import ConfigError, OutputFormat, QuantizeConfig
from onnxfgq.errors import OnnxfgqError


def cmd_quantize(args) -> int:
    from onnxfgq.api import quantize_file

    config = config_from_args(args)
    if not args.no_eval and not getattr(args, "perplexity", None):
        args.eval_reader = open_eval(args.model, args)  # a bad --eval-data fails now, not after the work
    if config.activations is not None:
        return _cmd_quantize_static(args, config)
    parse_dims(args.dim)  # validate before the long part
    check_lm_args(args)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    if args.model.is_dir():
        if getattr(args, "resume", False):
            raise ConfigError("--resume", "folder outputs are not checkpointed; give the model file")
        return _quantize_folder(args, config, external)
    out = args.output or _default_output(args.model, config)
    _check_outputs(args, out)
    from onnxfgq.engine.checkpoint import work_folder_for
    from onnxfgq.graph import io

    with io.Staged(out) as staged:  # moved into place only after the evaluation and the report
        # the work folder sits beside the final output, so that --resume finds it again
        report = quantize_file(args.model, staged.path, config, progress=rich_progress, external=external,
                               resume=getattr(args, "resume", False), work_dir=work_folder_for(out))
        return _finish(args, report, staged, custom_ops=config.weights.resolved_format() is OutputFormat.CUSTOM)


def _default_output(model: Path, config: QuantizeConfig) -> Path:
    return model.with_name(f"{model.stem}.{config.weights.bits}bit.onnx")


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


def _finish_staged(args, report, staged, *, custom_ops: bool) -> int:
    import os

    from onnxfgq.graph.io import pause_point
    from onnxfgq.report import render

    if not args.no_eval:
        evaluate = evaluate_lm if getattr(args, "perplexity", None) else evaluate_outputs
        try:
            report.accuracy = evaluate(args.model, staged.path, args, custom_ops)
        except (OnnxfgqError, ConfigError):
            raise
        except Exception as exc:  # onnxruntime refusing the feeds, a model it cannot run, ...
            if args.debug:
                raise
            raise EvaluationError(f"the accuracy report failed, so nothing was written (--no-eval skips it): "
                                  f"{type(exc).__name__}: {one_line(exc)}") from exc
    console = make_console()
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
        evaluate = evaluate_lm if getattr(args, "perplexity", None) else evaluate_outputs
        report.accuracy = evaluate(args.model, out, args, custom_ops)
    console = make_console()
    render(report, console)
    console.print(f"wrote {out}")
    if args.report:
        args.report.write_text(report.to_json())
    return 0


def _cmd_quantize_static(args, config: QuantizeConfig) -> int:
    from onnxfgq.static import quantize_static_file

    parse_dims(args.dim)
    out = args.output or args.model.with_name(f"{args.model.stem}.{config.activations.dtype.value}.onnx")
    _check_outputs(args, out)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    from onnxfgq.graph import io

    with io.Staged(out) as staged:  # moved into place only after the evaluation and the report
        report = quantize_static_file(args.model, staged.path, config, progress=rich_progress, external=external,
                                      tokenizer=args.tokenizer, dims=parse_dims(args.dim))
        return _finish(args, report, staged, custom_ops=False)
