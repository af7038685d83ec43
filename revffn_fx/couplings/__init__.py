"""The couplings, one module each, and the registry everything reads: the CLI's choices,
option validation, the rewrite pass, plan and bench, ``to_original`` and the docs table.

Adding a coupling is one module here (its :class:`~.base.Coupling`) plus its rewrite pass
and tests; nothing else names couplings.
"""

from __future__ import annotations

from ..errors import ConversionError
from . import bdia, meft, momentum, none, revffn, revnet
from .base import Coupling

REGISTRY: dict[str, Coupling] = {m.COUPLING.name: m.COUPLING for m in (
    revffn, revnet, momentum, meft, bdia, none)}
NAMES: tuple[str, ...] = tuple(REGISTRY)
#: the exact mode's name (no coupling)
EXACT = none.COUPLING.name


def get(name: str) -> Coupling:
    """The coupling called ``name``; a ConversionError listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConversionError(f"unknown coupling {name!r}; choose from "
                              f"{', '.join(NAMES)}") from None


def table() -> str:
    """A markdown table of the couplings (docs, ``--help``)."""
    rows = ["| coupling | streams | update | original architecture | summary |",
            "|---|---|---|---|---|"]
    for c in REGISTRY.values():
        rows.append(f"| {c.name} | {c.split or '-'} | {c.update if c.converts else '-'} | "
                    f"{'yes' if c.preserves_function else 'no'} | {c.summary} |")
    return "\n".join(rows)


__all__ = ["EXACT", "NAMES", "REGISTRY", "Coupling", "get", "table"]
