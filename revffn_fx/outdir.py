"""Writing OUT_DIR safely: refusals, a lock, a visible staging directory, a crash-safe swap.

At every instant OUT_DIR is either the complete old directory or the complete new one:

1. ``OUT.revffn-lock`` beside OUT_DIR is locked (``flock``) for the whole write, so a
   second writer exits at once with one line instead of silently replacing the first.
2. Everything is written into ``OUT.revffn-tmp-<pid>`` beside OUT_DIR.
3. The swap: on Linux one ``renameat2(RENAME_EXCHANGE)`` exchanges the two directories
   atomically; elsewhere OUT_DIR is renamed to ``OUT.revffn-old-<pid>`` and the new one
   renamed in (two renames; a run killed between them is repaired by the next run, which
   renames the old one back).
4. The old directory, now under its ``.revffn-old-<pid>`` name, is deleted last: a
   failure there never touches OUT_DIR.

Every directory revffn-fx writes carries a marker, ``.revffn-fx``: a random token per run,
the process id and (once written) the files it wrote. The run's token is also recorded in
the lock file. A later run into the same OUT_DIR removes (or, killed between the two
renames, restores) only the leftovers whose marker holds the token the lock file recorded
for their (dead) process, and says so; anything else named like a leftover is left alone
with a warning. ``--force`` replaces only an OUT_DIR with the marker and no file revffn-fx
did not write (``--force-foreign`` replaces anything else). MODEL_DIR and every directory
above it are compared by device and inode, not by path, with OUT_DIR, everything inside
it, and every leftover: a bind mount or a hard-to-see alias is never renamed or deleted.
SIGTERM and SIGHUP clean up like Ctrl-C. Nothing here imports torch, so the CLI answers a
bad OUT_DIR in milliseconds.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError

TMP_TAG, OLD_TAG, LOCK_TAG = ".revffn-tmp-", ".revffn-old-", ".revffn-lock"
#: in every directory revffn-fx writes (the staging directory, which becomes the export)
MARKER = ".revffn-fx"
#: written into OUT_DIR just before a swap moves it aside (it is then deleted or restored)
ASIDE = ".revffn-aside"
log = logging.getLogger("revffn_fx.export")

Ids = AbstractSet[tuple[int, int]]


# ------------------------------------------------------------------------ markers and ids

def write_marker(directory: Path, token: str, name: str = MARKER,
                 files: list[str] | None = None) -> None:
    """Mark ``directory`` as written by this revffn-fx run (``token``: the run's)."""
    record: dict[str, object] = {"written_by": "revffn-fx", "token": token, "pid": os.getpid()}
    if files is not None:
        record["files"] = sorted(files)
    (directory / name).write_text(json.dumps(record) + "\n")


def read_marker(directory: Path, name: str = MARKER) -> dict[str, object] | None:
    """The marker ``name`` of ``directory``, or None when absent or not revffn-fx's."""
    file = directory / name
    try:
        st = os.lstat(file)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        record = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError):
        return None
    if (not isinstance(record, dict) or record.get("written_by") != "revffn-fx"
            or not isinstance(record.get("token"), str)):
        return None
    return record


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


# ------------------------------------------------------------------------------ refusals

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


# -------------------------------------------------------------------------- test hook

def pause(point: str) -> None:
    """Test hook: with ``REVFFN_TEST_PAUSE=<point>``, create the file named by
    ``REVFFN_TEST_PAUSE_MARK`` and wait (at most a minute) until it is deleted, so a test can
    kill the process exactly here, or let it go on."""
    if os.environ.get("REVFFN_TEST_PAUSE") != point:
        return
    mark = Path(os.environ.get("REVFFN_TEST_PAUSE_MARK", f"revffn-pause-{os.getpid()}"))
    mark.write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while mark.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


# ------------------------------------------------------------------------------ the write

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _runs(text: str) -> dict[int, str]:
    """The runs a lock file records, ``{pid: token}`` (an unreadable record: none)."""
    try:
        runs = json.loads(text).get("runs", [])
        return {int(r["pid"]): str(r["token"]) for r in runs}
    except (ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return {}


def _lock_path(out: Path) -> Path:
    return out.parent / f"{out.name}{LOCK_TAG}"


def recover(out: Path, model_dir: Path | None = None,
            runs: dict[int, str] | None = None) -> dict[int, str]:
    """Repair and remove what killed runs into ``out`` left beside it (call under the lock).

    Only a directory whose marker holds the token that the lock file recorded for its dead
    process is touched, and never MODEL_DIR or a directory above it (device and inode).
    ``runs``: the lock file's record (read from it when None). Returns the runs whose
    leftovers are still there."""
    if runs is None:
        try:
            runs = _runs(_lock_path(out).read_text())
        except (OSError, UnicodeDecodeError):
            runs = {}
    protect = protected_ids(model_dir)
    pattern = re.compile(re.escape(out.name) + r"\.revffn-(tmp|old)-(\d+)$")
    leftovers = sorted((m.group(1), int(m.group(2)), p) for p in out.parent.iterdir()
                       if (m := pattern.match(p.name)))
    left: dict[int, str] = {}
    for kind, pid, path in leftovers:
        if pid != os.getpid() and _pid_alive(pid):
            log.warning("warning: %s: left by process %d, which still runs; not touched", path,
                        pid)
            continue
        if path.is_symlink() or not path.is_dir() or _id(path) in protect:
            why = ("it is MODEL_DIR or a directory above it" if _id(path) in protect
                   else "not a directory")
            log.warning("warning: %s: named like a leftover of a killed revffn-fx run, but %s; "
                        "not touched", path, why)
            continue
        token = runs.get(pid)
        staged, aside = read_marker(path), read_marker(path, ASIDE)
        ours = [m for m in (staged, aside)
                if m is not None and token is not None and m.get("token") == token]
        if not ours:
            log.warning("warning: %s: named like a leftover of a killed revffn-fx run, but "
                        "not marked by it (no %s marker with the token %s records for it); "
                        "not touched: delete it yourself if it is not needed", path, MARKER,
                        _lock_path(out).name)
            continue
        if kind == "old" and aside in ours and not os.path.lexists(out):
            os.rename(path, out)  # killed between the two renames: the old one is complete
            try:
                os.unlink(out / ASIDE)
            except OSError:
                pass
            log.warning("warning: %s: restored from %s (a killed run had moved it aside)", out,
                        path.name)
            continue
        try:
            remove_tree(path, protect, ASIDE if aside in ours else MARKER)
        except OSError:
            pass
        if os.path.lexists(path):
            left[pid] = token  # type: ignore[assignment]
            log.warning("warning: %s: leftover of a killed run, could not be removed", path)
        else:
            log.warning("warning: %s: removed, left by a killed revffn-fx run (process %d)",
                        path, pid)
    stray = read_marker(out, ASIDE) if out.is_dir() and not out.is_symlink() else None
    if stray is not None and stray.get("token") in runs.values():
        os.unlink(out / ASIDE)  # a run killed just before its swap had marked OUT_DIR
    legacy = sorted(out.parent.glob(f".{out.name}.revffn-tmp-*"))
    if legacy:
        log.warning("warning: %s: leftover staging directory of an older revffn-fx (delete it "
                    "if no revffn-fx runs)", legacy[0])
    return left


class _Lock:
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
def _lock(out: Path) -> Iterator[_Lock]:
    """Hold ``OUT.revffn-lock`` beside ``out``; a second writer gets an ExportError at once."""
    import fcntl

    lock = _lock_path(out)
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
    held = _Lock(fd, "")
    try:
        held.previous = os.pread(fd, 1 << 20, 0).decode(errors="replace")
        yield held
    finally:
        try:
            if not held.keep:  # kept: it records leftovers the next run may remove
                os.unlink(lock)
        finally:
            os.close(fd)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # a signal the user ignores (nohup) stays ignored
    saved = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)
             if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


@contextmanager
def _signals_blocked() -> Iterator[None]:
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of ``out``; return them, deepest first."""
    created = []
    for p in out.absolute().parents:
        if p.exists():
            break
        created.append(p)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise ExportError(f"{out}: not writable: {e.strerror or e}") from e
    return created


def _remove_empty(dirs: Iterable[Path]) -> None:
    for p in dirs:  # deepest first; never a directory someone else filled meanwhile
        try:
            p.rmdir()
        except OSError:
            break


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); False where unsupported."""
    if sys.platform != "linux" or os.environ.get("REVFFN_TEST_PAUSE") == "aside":
        return False  # the test of the two-rename path asks for it by its pause point
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_in(tmp: Path, out: Path, token: str, protect: Ids) -> bool:
    """Make ``tmp`` the new ``out``; the old ``out`` (if any), marked as moved aside by this
    run, is deleted afterwards. False when the old one could not be fully deleted."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return True
    old = out.parent / f"{out.name}{OLD_TAG}{os.getpid()}"
    with _signals_blocked():  # Ctrl-C or SIGTERM between two renames waits for the second
        try:
            write_marker(out, token, ASIDE)  # what recovery looks for, under either name
        except OSError:
            if os.path.lexists(out / ASIDE):
                os.unlink(out / ASIDE)
            raise
        if _exchange(tmp, out):
            os.rename(tmp, old)  # tmp now holds the old directory
        else:
            os.rename(out, old)
            pause("aside")
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)  # put the old one back before reporting
                os.unlink(out / ASIDE)
                raise
    pause("swapped")
    return _delete_old(old, protect)


def _delete_old(old: Path, protect: Ids) -> bool:
    if os.environ.get("REVFFN_TEST_PAUSE") == "deleting":
        first = next((p for p in old.rglob("*") if p.is_file() and p.name != ASIDE), None)
        if first is not None:
            first.unlink()
        pause("deleting")
    try:
        remove_tree(old, protect, ASIDE)
    except OSError as e:
        log.warning("warning: the previous OUT_DIR, moved aside to %s, could not be fully "
                    "removed (%s); delete it by hand", old, e.strerror or e)
    return not os.path.lexists(old)


@contextmanager
def writing(out: Path, *, force: bool, model_dir: Path | None = None,
            merge: bool = False, force_foreign: bool = False) -> Iterator[Path]:
    """Lock ``out``, yield a fresh staging directory beside it, and swap it in on success.

    ``merge`` (``save_pretrained`` into an existing directory, e.g. a Trainer checkpoint):
    the entries of the old ``out`` that the new one does not write are carried into the
    staging directory first (hard links where possible), so the swap is still one step.
    ``force`` replaces an OUT_DIR revffn-fx wrote, ``force_foreign`` any directory.
    The staging directory carries the run's marker (:data:`MARKER`), which lists the files
    written when the swap comes. Any failure, Ctrl-C or SIGTERM removes the staging
    directory and leaves ``out`` as it was; an OSError (a full disk, a permission) becomes
    a one-line ExportError.
    """
    foreign = force_foreign or merge
    check_out_dir(out, force or merge, model_dir, force_foreign=foreign)
    created = _make_parents(out)
    protect = protected_ids(model_dir)
    token = secrets.token_hex(16)
    ok = False
    try:
        with _signals_interrupt(), _lock(out) as lock:
            left = recover(out, model_dir, _runs(lock.previous))
            # again, now that we hold the lock
            check_out_dir(out, force or merge, model_dir, force_foreign=foreign)
            lock.record({**left, os.getpid(): token})  # before anything exists to recover
            tmp = out.parent / f"{out.name}{TMP_TAG}{os.getpid()}"
            try:
                os.mkdir(tmp)  # the user's umask applies, unlike mkdtemp's 0700
                write_marker(tmp, token)
                yield tmp
                write_marker(tmp, token, files=[n for n in os.listdir(tmp) if n != MARKER])
                if merge and out.is_dir():
                    _carry_over(out, tmp)
                pause("staged")
                if not _swap_in(tmp, out, token, protect):
                    left[os.getpid()] = token  # the next run removes the rest
            except OSError as e:
                _remove_staging(tmp, protect)
                where = e.filename or out
                raise ExportError(f"{where}: {e.strerror or e} (nothing written; {out} "
                                  "unchanged)") from e
            except BaseException:
                _remove_staging(tmp, protect)
                raise
            if left:
                lock.record(left)
                lock.keep = True
        ok = True
    finally:
        if not ok:
            _remove_empty(created)


def _remove_staging(tmp: Path, protect: Ids) -> None:
    try:
        if os.path.lexists(tmp):
            remove_tree(tmp, protect, MARKER)
    except OSError:
        pass


# the files a save writes afresh: earlier shards and adapters must not linger beside them
_STALE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$|revffn_adapters\."
                    r"safetensors$")


def _carry_over(out: Path, tmp: Path) -> None:
    for entry in out.iterdir():
        dst = tmp / entry.name
        if os.path.lexists(dst) or _STALE.match(entry.name) or entry.name == ASIDE:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
