"""Console output of the command line: tables on stdout, progress bars on stderr."""

from __future__ import annotations

from collections.abc import Iterable


def make_console():
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


def one_line(exc: Exception, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] or type(exc).__name__
