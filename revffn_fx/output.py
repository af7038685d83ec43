"""Small output helpers shared by the command line and the library's reports: byte sizes in
a readable unit, and progress that shows in a terminal and in a pipe or a log alike.

Light on purpose (no torch, no rich at import): ``revffn --help`` imports it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

ProgressFn = Callable[[int, int, str], None]


def human_bytes(n: int | float) -> str:
    """Bytes in the largest binary unit that keeps the figure at or above 1, with three
    significant digits and at most three before the point: ``1536`` -> ``1.50 KiB``,
    ``5.3e8`` -> ``505 MiB``, ``0`` -> ``0 B``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size * 1000 / 1024:  # 1,011 MiB reads as 0.99 GiB: at most 3 digits
            v = n / size
            return f"{v:.2f} {unit}" if v < 10 else f"{v:.1f} {unit}" if v < 100 \
                else f"{v:.0f} {unit}"
    return f"{int(n)} B"


@contextmanager
def progress_reporter(what: str, stream: TextIO | None = None,
                      min_interval: float = 0.0) -> Iterator[ProgressFn]:
    """A ``progress(done, total, item)`` callback for long work, reported on ``stream``
    (stderr by default, so stdout stays clean for tables and JSON).

    On a terminal it draws a transient rich progress bar; anywhere else (a pipe, a log
    file, CI) it prints one plain line per call, ``what: done/total item``, flushed at
    once, so ``revffn bench ... 2>&1 | tee log`` shows the work as it happens.
    ``min_interval`` (seconds) thins the plain lines; the last one is always printed.
    """
    stream = sys.stderr if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(file=stream)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task(what, total=None)

            def draw(done: int, total: int, item: str) -> None:
                bar.update(task, completed=done, total=total, description=str(item))

            yield draw
        return
    start = time.monotonic()
    last = [float("-inf")]

    def line(done: int, total: int, item: str) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval:
            return
        last[0] = now
        stream.write(f"{what}: {done}/{total} {item} ({now - start:.0f}s)\n")
        stream.flush()

    yield line
