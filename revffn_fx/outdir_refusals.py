"""What may be replaced or deleted: the device and inode of MODEL_DIR and every directory
above it, the refusals of :func:`check_out_dir` (run before any work), and
:func:`remove_tree`, which never deletes a protected directory. Paths are compared by
device and inode, not by name, so a bind mount or a link is never renamed or deleted."""

from __future__ import annotations

import logging
import os
from collections.abc import Set as AbstractSet
from pathlib import Path

from .errors import ExportError
from .outdir_markers import ASIDE, MARKER, read_marker

log = logging.getLogger("revffn_fx.export")

Ids = AbstractSet[tuple[int, int]]


def _id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def protected_ids(model_dir: Path | None) -> Ids:
    """Device and inode of MODEL_DIR and of every directory above it (by the path as given
    and as resolved): none of them may be renamed or deleted."""
    if model_dir is None:
        return set()
    found: set[tuple[int, int]] = set()
    for p in (model_dir.absolute(), model_dir.resolve()):
        for q in (p, *p.parents):
            if (i := _id(q)) is not None:
                found.add(i)
    return found


def is_protected(path: Path, protect: Ids) -> bool:
    """Whether ``path`` is (by device and inode) one of the directories in ``protect``."""
    return _id(path) in protect


def check_out_dir(out: Path, force: bool, model_dir: Path | None = None, *,
                  force_foreign: bool = False) -> None:
    """Refuse an OUT_DIR that would clobber something, before any work is done.

    ``force`` replaces a non-empty OUT_DIR only when revffn-fx wrote it (its marker) and
    it holds nothing else; ``force_foreign`` replaces any directory."""
    if out.is_symlink():
        target = os.readlink(out)
        what = "a symbolic link" if out.exists() else "a dangling symbolic link"
        raise ExportError(f"{out}: is {what} (to {target}); give the real directory as OUT_DIR")
    dst = out.resolve()
    cwd = Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        raise ExportError(f"{out}: OUT_DIR is the current directory or one of its parents "
                          f"({dst}); give a new directory, e.g. ./out")
    if dst == Path.home().resolve() or dst == Path(dst.anchor):
        raise ExportError(f"{out}: OUT_DIR is the home directory or the filesystem root "
                          f"({dst}); give a new directory")
    if model_dir is not None:
        src = model_dir.resolve()
        if dst == src or src in dst.parents:
            raise ExportError(f"{out}: OUT_DIR must not be MODEL_DIR or inside it ({model_dir})")
        if dst in src.parents:  # --force would delete MODEL_DIR with the old OUT_DIR
            raise ExportError(f"{out}: OUT_DIR must not contain MODEL_DIR ({model_dir})")
        _check_aliases(out, model_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (force or force_foreign):
            raise ExportError(f"{out}: not empty (use --force / force=True to replace it)")
        if not force_foreign:
            _check_ours(out)
        _check_removable(out, protected_ids(model_dir))
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: not writable ({parent} is not a writable directory)")


def _check_aliases(out: Path, model_dir: Path) -> None:
    """OUT_DIR compared with MODEL_DIR by device and inode: the same directory under another
    path (a bind mount, a link in a parent) is refused like the same path."""
    model = _id(model_dir)
    above = protected_ids(model_dir)
    if (i := _id(out)) is not None and i in above:
        what = "is MODEL_DIR" if i == model else "contains MODEL_DIR"
        raise ExportError(f"{out}: OUT_DIR {what} ({model_dir}) under another path (a bind "
                          "mount or a link); give a new directory")
    for p in out.absolute().parents:
        if model is not None and _id(p) == model:
            raise ExportError(f"{out}: OUT_DIR must not be inside MODEL_DIR ({model_dir}; the "
                              f"same directory as {p})")


def _check_ours(out: Path) -> None:
    """--force replaces only what revffn-fx wrote: OUT_DIR's marker, and nothing else in it."""
    marker = read_marker(out)
    hint = "delete it yourself, or use --force-foreign / force_foreign=True to replace it"
    if marker is None:
        raise ExportError(f"{out}: not written by revffn-fx (no {MARKER} marker): --force "
                          f"replaces only revffn-fx's exports; {hint} (nothing was changed)")
    files = marker.get("files")
    if isinstance(files, list):
        extra = sorted(set(os.listdir(out)) - set(files) - {MARKER, ASIDE})
        if extra:
            raise ExportError(f"{out}: holds {extra[0]!r}, which revffn-fx did not write "
                              f"({len(extra)} such {'entry' if len(extra) == 1 else 'entries'}"
                              "): --force replaces only what "
                              f"revffn-fx wrote; move it out, or {hint} (nothing was changed)")


def _check_removable(out: Path, protect: Ids = frozenset()) -> None:
    """An OUT_DIR that --force replaces must be deletable as a whole, and hold no MODEL_DIR
    (or a directory above it) under another path: refuse it up front rather than leave its
    old copy half deleted."""
    for root, dirs, _ in os.walk(out):
        if _id(Path(root)) in protect:
            raise ExportError(f"{out}: cannot be replaced: {root} is MODEL_DIR or a directory "
                              "above it (a bind mount or a link; nothing was changed)")
        if not os.access(root, os.W_OK | os.X_OK):
            raise ExportError(f"{out}: cannot be replaced: {root} is not writable (nothing "
                              "was changed)")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def remove_tree(path: Path, protect: Ids = frozenset(), marker: str | None = None) -> None:
    """Delete ``path`` (not following links), never a directory whose device and inode are
    in ``protect`` (kept, with its parents); ``marker`` (a file directly in ``path``) is
    deleted last, so a run killed midway leaves a directory that is still recognised."""
    def walk(d: Path) -> bool:
        if _id(d) in protect:
            log.warning("warning: %s: not deleted: it is MODEL_DIR or a directory above it",
                        d)
            return False
        clean = True
        with os.scandir(d) as it:
            entries = list(it)
        for e in entries:
            if d == path and e.name == marker:
                continue
            if e.is_dir(follow_symlinks=False):
                clean = walk(Path(e.path)) and clean
            else:
                os.unlink(e.path)
        if not clean:
            return False
        if marker is not None and d == path and os.path.lexists(d / marker):
            os.unlink(d / marker)
        os.rmdir(d)
        return True

    walk(path)
