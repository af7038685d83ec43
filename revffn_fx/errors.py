"""Exceptions raised for problems a user can act on.

Every :class:`RevFFNError` carries a one-line message; the CLI prints it and exits with
status 2. Anything else that escapes is a bug (exit status 1), :class:`InternalError` among
them.
"""

from __future__ import annotations


class RevFFNError(Exception):
    """Base class: bad input or a check that failed, explained in one line."""


class LoadError(RevFFNError):
    """A model directory could not be loaded."""


class TraceError(RevFFNError):
    """A model could not be traced with torch.fx."""


class ConversionError(RevFFNError):
    """A model or layer cannot be rewritten into reversible couplings."""


class FixedPointError(RevFFNError, RuntimeError):
    """A fixed-point reconstruction (cross-branch attention) did not converge."""


class ExportError(RevFFNError):
    """A transformed model could not be written or read back."""


class InternalError(RuntimeError):
    """An invariant of revffn-fx's own code broke, e.g. a built-in pass failed or left a graph
    the next pass cannot read: a bug (exit status 1), never the user's input. Deliberately
    not a :class:`RevFFNError`."""


class ReconstructionError(RevFFNError, RuntimeError):
    """The run-time guard found a reversible layer's input, reconstructed in the backward,
    different from what the forward saw: the gradients would be wrong. Names the layer."""
