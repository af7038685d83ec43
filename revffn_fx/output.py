"""Light helpers of the command line and the library's reports: byte sizes read and
written in a readable unit, progress that shows in a terminal and in a pipe or a log
alike, and the cheap checks of a model directory made before the heavy imports.

Light on purpose (no torch, no transformers, no rich at import): ``revffn --help`` and
every bad-input answer import only this.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from revffn_fx.errors import LoadError

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


def parse_bytes(text: str) -> int:
    """``"80GB"``, ``"512MiB"``, ``"1e9"`` -> bytes (GB = 10^9, GiB = 2^30)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    if unit not in units:
        raise ValueError(f"bad size {text!r}: use e.g. 80GB or 24GiB")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 80GB or 24GiB") from None


def check_model_dir(path: str) -> None:
    """Raise LoadError unless ``path`` is a directory holding a config.json: the cheap
    checks, made before torch and transformers are imported (about 10 s), so a wrong path
    is answered at once. The config itself is checked when the model is loaded."""
    p = Path(path).expanduser()
    if not p.exists():
        raise LoadError(f"{p}: no such directory (revffn-fx loads local model directories "
                        "only; it never downloads from the hub)")
    if not p.is_dir():
        raise LoadError(f"{p}: not a directory (expected a model directory with config.json "
                        "and weights)")
    if not (p / "config.json").is_file():
        raise LoadError(f"{p / 'config.json'}: missing: no config.json (expected a Hugging "
                        "Face model directory)")
