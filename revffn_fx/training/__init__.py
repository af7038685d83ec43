"""Training helpers: the optimizer fused into backward, Trainer integration, and the
two-stage RevFFN recipe (adapters warm-up, then full fine-tuning)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "FusedOptimizer": ".fused",
    "fuse_optimizer": ".fused",
    "FusedOptimizerTrainer": ".trainer",
    "TwoStageCallback": ".two_stage",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    # lazy: importing transformers.Trainer is slow and most users need one of these only
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
