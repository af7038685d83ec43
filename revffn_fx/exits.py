"""The exit statuses of every revffn command, decided in one place.

0 success; 2 bad input or a check that failed (any :class:`revffn_fx.errors.RevFFNError`, a
usage error, the environment: a full disk, a permission, no memory), one line on stderr;
1 anything else, a bug in revffn-fx, including an
:class:`~revffn_fx.errors.InternalError` (an invariant of revffn-fx's own code, e.g. a
built-in pass, broke); set ``REVFFN_DEBUG=1`` for the full traceback. 130 interrupted.

Every command (:mod:`revffn_fx.cli` and the ``bench`` command it registers) is a
:class:`Command` (or :class:`Group`), so they map exceptions the same way whether run on
their own or under ``revffn``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, NoReturn

import click

from .errors import RevFFNError

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
# click >= 8.2 raises this for a bare ``revffn``; older click printed the help and exited 0
_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())

EXIT_HELP = """\b
Exit status:
  0  success
  2  bad input or a check that failed (one line on stderr, "error: ...")
  1  a bug in revffn-fx (set REVFFN_DEBUG=1 for the full traceback)"""


def one_line(text: str) -> str:
    """``text`` with its lines joined, so an error is always one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str, code: int) -> NoReturn:
    """Print ``error: message`` (one line) on stderr and exit with ``code``."""
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


def bug(exc: BaseException) -> NoReturn:
    """Report an unexpected exception: one line, where it happened, and how to see more."""
    if os.environ.get("REVFFN_DEBUG"):
        traceback.print_exception(type(exc), exc, exc.__traceback__)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in " \
            f"{frames[-1].name})" if frames else ""
    click.echo(f"error: internal error, a bug in revffn-fx: {type(exc).__name__}: "
               f"{one_line(str(exc)) or '(no message)'}{where}", err=True)
    if not os.environ.get("REVFFN_DEBUG"):
        click.echo("hint: rerun with REVFFN_DEBUG=1 for the full traceback, and report it",
                   err=True)
    sys.exit(EXIT_BUG)


class ExitStatus:
    """Mixin for click commands: maps exceptions to the documented exit statuses."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:  # a caller (a group, a script) handles the exceptions
            return super().main(args, prog_name, complete_var,  # type: ignore[misc]
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var,  # type: ignore[misc]
                              standalone_mode=False, **extra)
        except _NO_ARGS as e:  # bare ``revffn``: the help, as for --help
            click.echo(e.format_message())
            rv = EXIT_OK
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            fail(e.format_message() + hint, EXIT_BAD_INPUT)
        except click.ClickException as e:
            fail(e.format_message(), e.exit_code)
        except RevFFNError as e:
            fail(str(e) or type(e).__name__, EXIT_BAD_INPUT)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", EXIT_INTERRUPTED)
        except OSError as e:  # the environment (a full disk, a permission), not a bug
            fail(f"{e.filename or 'error'}: {e.strerror or e}", EXIT_BAD_INPUT)
        except MemoryError:
            fail("out of memory", EXIT_BAD_INPUT)
        except Exception as e:  # anything else is a bug, InternalError included
            bug(e)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)


class Command(ExitStatus, click.Command):
    """A click command with revffn's exit statuses."""


class Group(ExitStatus, click.Group):
    """A click group with revffn's exit statuses; its subcommands are plain commands."""
