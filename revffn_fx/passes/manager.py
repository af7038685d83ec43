"""PassManager: runs passes over a GraphModule, lints after each, keeps snapshots.

A pass is either a ``torch.fx.passes.infra.pass_base.PassBase`` (its ``requires`` and
``ensures`` are checked around ``call``) or any callable taking a GraphModule and
returning a ``PassResult``, a GraphModule, or None (modified in place). This follows
``torch.fx.passes.infra.pass_manager`` but also records a before/after snapshot of every
pass, from which diffs are rendered.

Who is to blame when a pass fails decides the exit status: a :class:`RevFFNError` (a
refusal of the user's model) passes through; any other exception, or an invalid graph, is
an :class:`InternalError` (a bug, exit 1) after a built-in pass (one defined in revffn_fx)
and a RevFFNError (the user's code, exit 2) after a user's pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import InternalError, RevFFNError

Pass = PassBase | Callable[[fx.GraphModule], Any]


@dataclass
class PassRecord:
    """What one pass did: its name, the graph before and after, whether it changed it."""

    name: str
    before: fx.GraphModule
    after: fx.GraphModule
    modified: bool


def pass_name(p: Pass) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def is_builtin(p: Pass) -> bool:
    """Whether ``p`` is revffn-fx's own pass (defined in the package), not a user's."""
    module = getattr(p, "__module__", None) or type(p).__module__
    return module == "revffn_fx" or module.startswith("revffn_fx.")


def _failure(p: Pass, what: str) -> Exception:
    """The error for pass ``p`` failing: a bug in ours, the user's problem in theirs."""
    if is_builtin(p):
        return InternalError(f"built-in pass {pass_name(p)} {what}")
    return RevFFNError(f"pass {pass_name(p)} {what}")


def snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of the graph over the same modules (weights are shared)."""
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    new.meta.update(getattr(gm, "meta", {}))
    return new


class PassManager:
    """Run ``passes`` in order over a GraphModule.

    After each pass the graph is linted and recompiled; with ``snapshots`` every pass's
    before/after graphs are kept in :attr:`records`.
    """

    def __init__(self, passes: Sequence[Pass], lint: bool = True, snapshots: bool = True,
                 invariant: Callable[[fx.GraphModule], str | None] | None = None) -> None:
        self.passes = list(passes)
        self.lint = lint
        self.snapshots = snapshots
        # ``invariant(gm)``: what is wrong with the graph, or None; once it holds (before
        # the passes or after one), every later pass must keep it, or is named as the culprit
        self.invariant = invariant
        self.records: list[PassRecord] = []

    def add_pass(self, p: Pass) -> None:
        self.passes.append(p)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified_any = False
        holds = self.invariant is not None and self.invariant(gm) is None
        for p in self.passes:
            name = pass_name(p)
            before = snapshot(gm) if self.snapshots else gm
            try:
                if isinstance(p, PassBase):
                    p.requires(gm)
                    result = p.call(gm)
                else:
                    result = p(gm)
            except RevFFNError:
                raise
            except Exception as exc:
                raise _failure(p, f"failed: {type(exc).__name__}: {exc}") from exc
            if isinstance(result, PassResult):
                gm, modified = result.graph_module, result.modified
            elif isinstance(result, fx.GraphModule):
                gm, modified = result, True
            elif result is None:
                modified = True
            else:
                raise _failure(p, f"returned {type(result).__name__}; expected a PassResult, "
                                  "a GraphModule or None")
            if self.lint:
                try:
                    gm.graph.lint()
                except Exception as exc:
                    raise _failure(p, f"left an invalid graph: {exc}") from exc
                gm.recompile()
            if isinstance(p, PassBase):
                p.ensures(gm)
            if self.invariant is not None:
                why = self.invariant(gm)
                if why is not None and holds:
                    raise _failure(p, f"broke the coupling: {why}")
                holds = why is None
            modified_any |= modified
            if self.snapshots:
                self.records.append(PassRecord(name, before, snapshot(gm), modified))
        return PassResult(gm, modified_any)
