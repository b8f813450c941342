"""Console output of the command line: tables on stdout, progress bars on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable


def make_console():
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 160  # logs and pipes: don't fold the layer table into 80 columns
    return console


LOG_EVERY_S = 10.0  # plain progress lines (stderr not a terminal): at most one per loop this often


def rich_progress(items: Iterable, total: int, label: str) -> Iterable:
    """A progress bar on stderr over ``items``, with elapsed time and an estimate; when stderr is not a
    terminal (a log file, a pipe), plain lines instead (``plain_progress``)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from plain_progress(items, total, label)
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=total or None)
        for item in items:
            yield item
            bar.advance(task)


def plain_progress(items: Iterable, total: int, label: str, *, every: float = LOG_EVERY_S, stream=None,
                   clock=time.monotonic) -> Iterable:
    """Progress as plain lines on stderr: one at most every ``every`` seconds while the loop runs
    (done/total, elapsed, an estimate of what is left), and one when it ends if it took that long or
    is a step of a block-by-block run ("block ..." labels: one line per block and step)."""
    stream = stream or sys.stderr
    start = last = now = clock()
    done = 0
    for item in items:
        yield item
        done += 1
        now = clock()
        if now - last >= every and done < (total or done + 1):
            left = f", about {_duration((now - start) / done * (total - done))} left" if total else ""
            of = f"/{total}" if total else ""
            print(f"onnxfgq: {label}: {done}{of}, {_duration(now - start)} elapsed{left}", file=stream, flush=True)
            last = now
    took = now - start  # up to the end of the last item's work
    if took >= every or label.startswith("block "):
        print(f"onnxfgq: {label}: {done} done in {_duration(took)}", file=stream, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__
