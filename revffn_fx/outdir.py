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

A later run into the same OUT_DIR removes the leftovers of killed runs (their pid is
dead). SIGTERM and SIGHUP clean up like Ctrl-C. Nothing here imports torch, so the CLI
answers a bad OUT_DIR in milliseconds.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError

TMP_TAG, OLD_TAG, LOCK_TAG = ".revffn-tmp-", ".revffn-old-", ".revffn-lock"
log = logging.getLogger("revffn_fx.export")


# ------------------------------------------------------------------------------ refusals

def check_out_dir(out: Path, force: bool, model_dir: Path | None = None) -> None:
    """Refuse an OUT_DIR that would clobber something, before any work is done."""
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
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out}: not empty (use --force / force=True to replace it)")
        _check_removable(out)
    parent = dst.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: not writable ({parent} is not a writable directory)")


def _check_removable(out: Path) -> None:
    """An OUT_DIR that --force replaces must be deletable as a whole: refuse it up front
    rather than leave its old copy half deleted."""
    for root, dirs, _ in os.walk(out):
        if not os.access(root, os.W_OK | os.X_OK):
            raise ExportError(f"{out}: cannot be replaced: {root} is not writable (nothing "
                              "was changed)")
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


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


def recover(out: Path) -> None:
    """Repair and remove what killed runs into ``out`` left beside it (call under the lock)."""
    pattern = re.compile(re.escape(out.name) + r"\.revffn-(tmp|old)-(\d+)$")
    leftovers = sorted((m.group(1), int(m.group(2)), p) for p in out.parent.iterdir()
                       if (m := pattern.match(p.name)))
    for kind, pid, path in leftovers:
        if pid != os.getpid() and _pid_alive(pid):
            log.warning("warning: %s: left by process %d, which still runs; not touched", path,
                        pid)
            continue
        if kind == "old" and not os.path.lexists(out):
            os.rename(path, out)  # killed between the two renames: the old one is complete
            log.warning("warning: %s: restored from %s (a killed run had moved it aside)", out,
                        path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            log.warning("warning: %s: leftover of a killed run, could not be removed", path)
    legacy = sorted(out.parent.glob(f".{out.name}.revffn-tmp-*"))
    if legacy:
        log.warning("warning: %s: leftover staging directory of an older revffn-fx (delete it "
                    "if no revffn-fx runs)", legacy[0])


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``OUT.revffn-lock`` beside ``out``; a second writer gets an ExportError at once."""
    import fcntl

    lock = out.parent / f"{out.name}{LOCK_TAG}"
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
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
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


def _swap_in(tmp: Path, out: Path) -> None:
    """Make ``tmp`` the new ``out``; the old ``out`` (if any) is deleted afterwards."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = out.parent / f"{out.name}{OLD_TAG}{os.getpid()}"
    with _signals_blocked():  # Ctrl-C or SIGTERM between two renames waits for the second
        if _exchange(tmp, out):
            os.rename(tmp, old)  # tmp now holds the old directory
        else:
            os.rename(out, old)
            pause("aside")
            try:
                os.rename(tmp, out)
            except OSError:
                os.rename(old, out)  # put the old one back before reporting
                raise
    pause("swapped")
    _delete_old(old)


def _delete_old(old: Path) -> None:
    if os.environ.get("REVFFN_TEST_PAUSE") == "deleting":
        first = next((p for p in old.rglob("*") if p.is_file()), None)
        if first is not None:
            first.unlink()
        pause("deleting")
    try:
        shutil.rmtree(old)
    except OSError as e:
        log.warning("warning: the previous OUT_DIR, moved aside to %s, could not be fully "
                    "removed (%s); delete it by hand", old, e.strerror or e)


@contextmanager
def writing(out: Path, *, force: bool, model_dir: Path | None = None,
            merge: bool = False) -> Iterator[Path]:
    """Lock ``out``, yield a fresh staging directory beside it, and swap it in on success.

    ``merge`` (``save_pretrained`` into an existing directory, e.g. a Trainer checkpoint):
    the entries of the old ``out`` that the new one does not write are carried into the
    staging directory first (hard links where possible), so the swap is still one step.
    Any failure, Ctrl-C or SIGTERM removes the staging directory and leaves ``out`` as it
    was; an OSError (a full disk, a permission) becomes a one-line ExportError.
    """
    check_out_dir(out, force or merge, model_dir)
    created = _make_parents(out)
    ok = False
    try:
        with _signals_interrupt(), _lock(out):
            recover(out)
            check_out_dir(out, force or merge, model_dir)  # again, now that we hold the lock
            tmp = out.parent / f"{out.name}{TMP_TAG}{os.getpid()}"
            try:
                os.mkdir(tmp)  # the user's umask applies, unlike mkdtemp's 0700
                yield tmp
                if merge and out.is_dir():
                    _carry_over(out, tmp)
                pause("staged")
                _swap_in(tmp, out)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                where = e.filename or out
                raise ExportError(f"{where}: {e.strerror or e} (nothing written; {out} "
                                  "unchanged)") from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        ok = True
    finally:
        if not ok:
            _remove_empty(created)


# the files a save writes afresh: earlier shards and adapters must not linger beside them
_STALE = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$|revffn_adapters\."
                    r"safetensors$")


def _carry_over(out: Path, tmp: Path) -> None:
    for entry in out.iterdir():
        dst = tmp / entry.name
        if os.path.lexists(dst) or _STALE.match(entry.name):
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
