"""``onnxfgq eval`` and the accuracy report of ``quantize``: output comparison or causal-LM perplexity."""

from __future__ import annotations

from pathlib import Path

from onnxfgq.cli.args import parse_dims
from onnxfgq.cli.console import make_console, rich_progress
from onnxfgq.config import ConfigError


def open_eval(reference: Path, args):
    """The --eval-data reader on the reference model: the same source-opening function (and --dim,
    --tokenizer, the model's folder) as calibration. Opened before any long work to check it."""
    from onnxfgq.calibration.feeds import FeedOptions
    from onnxfgq.calibration.sources import open_source
    from onnxfgq.graph import io

    if args.eval_samples < 1:
        raise ConfigError("--eval-samples", f"must be >= 1, got {args.eval_samples}")
    if args.batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {args.batch_size}")
    reference = model_file(reference)
    options = FeedOptions(dims=parse_dims(args.dim), tokenizer=args.tokenizer, model_dir=Path(reference).resolve().parent)
    return open_source(args.eval_data, io.load(reference), num_samples=args.eval_samples,
                       batch_size=args.batch_size, options=options, option="--eval-data")


def evaluate_outputs(reference: Path, candidate: Path, args, custom_ops: bool):
    from onnxfgq.evaluate import compare
    from onnxfgq.report import Accuracy

    reader = getattr(args, "eval_reader", None) or open_eval(reference, args)
    batch = getattr(reader, "fixed_batch", None) or args.batch_size
    total = -(-len(reader) // batch) if hasattr(reader, "__len__") else 0
    metrics, n = compare(reference, candidate, reader, custom_ops=custom_ops, progress=rich_progress, total=total)
    how = getattr(reader, "description", "")
    return Accuracy(f"{args.eval_data} ({how})" if how else args.eval_data, n, metrics)


def evaluate_lm(reference: Path, candidate: Path, args, custom_ops: bool):
    """--perplexity text:FILE: perplexity of both models and the candidate's next-token agreement."""
    from onnxfgq import lm_eval
    from onnxfgq.report import Accuracy

    text = check_lm_args(args)
    windows = lm_eval.text_windows(text, args.tokenizer, args.lm_window, args.lm_max_windows,
                                   model_dir=reference if Path(reference).is_dir() else Path(reference).parent)
    result = lm_eval.evaluate({"reference": reference, "candidate": candidate}, windows,
                              batch_size=args.batch_size, custom_ops=custom_ops, progress=rich_progress)
    return Accuracy(f"{args.perplexity} ({result.windows} windows of {result.length} tokens)",
                    result.windows, result.metrics())


def check_lm_args(args) -> Path | None:
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


def model_file(path: Path) -> Path:
    """An export folder stands for the model file its client loads."""
    if Path(path).is_dir():
        from onnxfgq import folders

        return folders.open_folder(path).model
    return path


def cmd_eval(args) -> int:
    args.reference, args.candidate = model_file(args.reference), model_file(args.candidate)
    custom = uses_custom_ops(args.candidate)
    acc = (evaluate_lm if args.perplexity else evaluate_outputs)(args.reference, args.candidate, args, custom)
    from onnxfgq.report import format_metrics, nonfinite_note

    console = make_console()
    console.print(f"{args.candidate} vs {args.reference} on {acc.samples} samples of {acc.data}: "
                  f"{format_metrics(acc.metrics)}")
    if nonfinite_note(acc.metrics):
        console.print(f"warning: {nonfinite_note(acc.metrics)}")
    return 0


def uses_custom_ops(path: Path) -> bool:
    from onnxfgq.graph import io

    return any(d == "com.onnxfgq" for d in io.load(path).opset_imports)
