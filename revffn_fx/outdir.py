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

This module holds the write (:func:`writing`) and the swap; the parts it uses are
:mod:`revffn_fx.outdir_markers` (names and markers), :mod:`revffn_fx.outdir_refusals`
(:func:`check_out_dir`, device/inode protection, :func:`remove_tree`),
:mod:`revffn_fx.outdir_lock` (the lock file) and :mod:`revffn_fx.outdir_recovery`
(:func:`recover`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ExportError
from .outdir_lock import hold_lock, recorded_runs
from .outdir_markers import ASIDE, MARKER, OLD_TAG, TMP_TAG, write_marker
from .outdir_recovery import recover
from .outdir_refusals import Ids, check_out_dir, protected_ids, remove_tree

log = logging.getLogger("revffn_fx.export")


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
        with _signals_interrupt(), hold_lock(out) as lock:
            left = recover(out, model_dir, recorded_runs(lock.previous))
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
