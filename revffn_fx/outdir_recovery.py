"""Recovery of what killed runs into OUT_DIR left beside it (run under the lock): their
staging directories are removed, an old OUT_DIR moved aside between the two renames of a
swap is renamed back. Only a directory whose marker holds the token the lock file recorded
for its dead process is touched."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .outdir_lock import lock_path, recorded_runs
from .outdir_markers import ASIDE, MARKER, read_marker
from .outdir_refusals import Ids, is_protected, protected_ids, remove_tree

log = logging.getLogger("revffn_fx.export")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def recover(out: Path, model_dir: Path | None = None,
            runs: dict[int, str] | None = None) -> dict[int, str]:
    """Repair and remove what killed runs into ``out`` left beside it (call under the lock).

    Only a directory whose marker holds the token that the lock file recorded for its dead
    process is touched, and never MODEL_DIR or a directory above it (device and inode).
    ``runs``: the lock file's record (read from it when None). Returns the runs whose
    leftovers are still there."""
    if runs is None:
        try:
            runs = recorded_runs(lock_path(out).read_text())
        except (OSError, UnicodeDecodeError):
            runs = {}
    protect = protected_ids(model_dir)
    pattern = re.compile(re.escape(out.name) + r"\.revffn-(tmp|old)-(\d+)$")
    leftovers = sorted((m.group(1), int(m.group(2)), p) for p in out.parent.iterdir()
                       if (m := pattern.match(p.name)))
    left: dict[int, str] = {}
    for kind, pid, path in leftovers:
        aside = _killed_runs_own(out, path, pid, runs.get(pid), protect)
        if aside is None:
            continue
        if not _repair(out, kind, pid, path, aside, protect):
            left[pid] = runs[pid]
    stray = read_marker(out, ASIDE) if out.is_dir() and not out.is_symlink() else None
    if stray is not None and stray.get("token") in runs.values():
        os.unlink(out / ASIDE)  # a run killed just before its swap had marked OUT_DIR
    legacy = sorted(out.parent.glob(f".{out.name}.revffn-tmp-*"))
    if legacy:
        log.warning("warning: %s: leftover staging directory of an older revffn-fx (delete it "
                    "if no revffn-fx runs)", legacy[0])
    return left


def _killed_runs_own(out: Path, path: Path, pid: int, token: str | None,
                     protect: Ids) -> bool | None:
    """None (with a warning) unless ``path`` is a leftover of dead process ``pid`` marked
    with ``token``; else whether its mark is the moved-aside one (:data:`ASIDE`)."""
    if pid != os.getpid() and _pid_alive(pid):
        log.warning("warning: %s: left by process %d, which still runs; not touched", path,
                    pid)
        return None
    if path.is_symlink() or not path.is_dir() or is_protected(path, protect):
        why = ("it is MODEL_DIR or a directory above it" if is_protected(path, protect)
               else "not a directory")
        log.warning("warning: %s: named like a leftover of a killed revffn-fx run, but %s; "
                    "not touched", path, why)
        return None
    staged, aside = read_marker(path), read_marker(path, ASIDE)
    ours = [m for m in (staged, aside)
            if m is not None and token is not None and m.get("token") == token]
    if not ours:
        log.warning("warning: %s: named like a leftover of a killed revffn-fx run, but "
                    "not marked by it (no %s marker with the token %s records for it); "
                    "not touched: delete it yourself if it is not needed", path, MARKER,
                    lock_path(out).name)
        return None
    return aside in ours


def _repair(out: Path, kind: str, pid: int, path: Path, aside: bool, protect: Ids) -> bool:
    """Rename a complete old OUT_DIR back, or remove the leftover; False when it could not
    be removed."""
    if kind == "old" and aside and not os.path.lexists(out):
        os.rename(path, out)  # killed between the two renames: the old one is complete
        try:
            os.unlink(out / ASIDE)
        except OSError:
            pass
        log.warning("warning: %s: restored from %s (a killed run had moved it aside)", out,
                    path.name)
        return True
    try:
        remove_tree(path, protect, ASIDE if aside else MARKER)
    except OSError:
        pass
    if os.path.lexists(path):
        log.warning("warning: %s: leftover of a killed run, could not be removed", path)
        return False
    log.warning("warning: %s: removed, left by a killed revffn-fx run (process %d)",
                path, pid)
    return True
