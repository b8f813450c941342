"""``onnxfgq`` command line: ``quantize``, ``inspect``, ``eval`` and ``calibrate``.

``main`` turns every expected failure into one line on stderr and exit code 2 (tracebacks only with
``--debug``), and SIGINT/SIGTERM into exit codes 130/143 after the temporary files are removed."""

from __future__ import annotations

import sys

from onnxfgq.cli.args import build_parser, config_from_args
from onnxfgq.cli.console import one_line, rich_progress
from onnxfgq.config import ConfigError
from onnxfgq.errors import OnnxfgqError

__all__ = ["build_parser", "config_from_args", "main", "rich_progress"]


def _commands() -> dict:
    from onnxfgq.cli.commands import cmd_calibrate, cmd_inspect
    from onnxfgq.cli.evaluate import cmd_eval
    from onnxfgq.cli.quantize import cmd_quantize

    return {"quantize": cmd_quantize, "inspect": cmd_inspect, "eval": cmd_eval, "calibrate": cmd_calibrate}


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
        return _commands()[args.command](args)
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
        print(f"onnxfgq: error: {'onnxruntime: ' if from_ort else ''}{one_line(exc)}", file=sys.stderr)
        return 2
