"""The lock file beside OUT_DIR (``OUT.revffn-lock``): held with ``flock`` for a whole write
so a second writer stops at once, and recording the runs (process id, token) whose
leftovers the next run may remove."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError
from .outdir_markers import LOCK_TAG


def lock_path(out: Path) -> Path:
    """``OUT.revffn-lock`` beside ``out``."""
    return out.parent / f"{out.name}{LOCK_TAG}"


def recorded_runs(text: str) -> dict[int, str]:
    """The runs a lock file records, ``{pid: token}`` (an unreadable record: none)."""
    try:
        runs = json.loads(text).get("runs", [])
        return {int(r["pid"]): str(r["token"]) for r in runs}
    except (ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return {}


class HeldLock:
    """The held lock file: what the previous holder recorded, and this run's record."""

    def __init__(self, fd: int, previous: str) -> None:
        self.fd, self.previous, self.keep = fd, previous, False

    def record(self, runs: dict[int, str]) -> None:
        """Record the runs whose leftovers the next run may remove (this one included)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"runs": [{"pid": p, "token": t}
                                                for p, t in runs.items()]}).encode() + b"\n", 0)
        os.fsync(self.fd)


@contextmanager
def hold_lock(out: Path) -> Iterator[HeldLock]:
    """Hold ``OUT.revffn-lock`` beside ``out``; a second writer gets an ExportError at once."""
    import fcntl

    lock = lock_path(out)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExportError(f"{out}: another revffn-fx process is writing it (lock {lock} is "
                              "held); wait for it to finish") from None
        try:  # the holder before us may have unlinked the file: lock the one on disk
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    held = HeldLock(fd, "")
    try:
        held.previous = os.pread(fd, 1 << 20, 0).decode(errors="replace")
        yield held
    finally:
        try:
            if not held.keep:  # kept: it records leftovers the next run may remove
                os.unlink(lock)
        finally:
            os.close(fd)
