"""Reversible layers and stacks: the modules the compiler's output runs on.

A reversible layer is a list of additive updates over streams,
``stream[target] += branch(*stream[reads], **ctx)``, applied in order. The forward of a
stack keeps only its final streams; the backward (``function.py``) walks the updates in
reverse, reconstructing each stream and recomputing each branch once.
This module knows nothing of torch.fx: a branch is any callable module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .router import RouterTap
from .streams import MERGES, SPLITS


@dataclass
class RuntimeOptions:
    """Switches shared by every stack of one model."""

    plain_autograd: bool = False  # run with ordinary autograd (the reference)
    router_tap: RouterTap | None = None
    record_router_logits: bool = False
    fixed_point_iters: int = 50
    fixed_point_tol: float = 1e-6
    # "<layer>.<update>" -> (iterations, final relative residual) of the latest backward
    fixed_point_stats: dict[str, tuple[int, float]] = field(default_factory=dict)
    num_items_in_batch: Any = None  # the loss normaliser the Trainer passes, per call
    # called with (parameter, complete gradient) from inside the generated backward; the
    # fused optimizer sets it (see revffn_fx.training.fused)
    grad_sink: Any = None
    # dtype the streams are carried in inside a stack (None: the hidden state's). A wider
    # dtype makes the additions of the couplings (nearly) exact, so the backward's
    # reconstruction does not accumulate rounding error through large-gain branches; each
    # branch still computes in the hidden state's dtype.
    stream_dtype: torch.dtype | None = None


class Update(nn.Module):
    """``stream[target] = scale * stream[target] + branch(*stream[reads], **ctx[ctx_names])``.

    ``scale`` (default 1: the additive update) is how much of the overwritten stream is
    kept; the momentum and meft couplings keep a fraction, so their inverse divides by it.
    """

    def __init__(self, branch: nn.Module, target: int, reads: list[int],
                 ctx_names: list[str], scale: float = 1.0) -> None:
        super().__init__()
        self.branch = branch
        self.target = target
        self.reads = list(reads)
        self.ctx_names = list(ctx_names)
        self.scale = float(scale)
        # set by RevStack.forward when the streams are wider than the branch computes in
        self.compute_dtype: torch.dtype | None = None

    @property
    def closed_form(self) -> bool:
        """The branch does not read the stream it updates: invert by subtraction."""
        return self.target not in self.reads

    def run(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> torch.Tensor:
        xs = [streams[i] for i in self.reads]
        if self.compute_dtype is not None:
            xs = [x.to(self.compute_dtype) for x in xs]
        return self.branch(*xs, **{k: ctx[k] for k in self.ctx_names})

    def combine(self, streams: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """The new value of the target stream, given the branch output ``out``."""
        old = streams[self.target]
        return (old if self.scale == 1.0 else old * self.scale) + out

    def invert(self, new: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The old value of the target stream from its new value and the branch output."""
        old = new - out
        return old if self.scale == 1.0 else old / self.scale


class RevLayer(nn.Module):
    """One reversible coupling: its updates, in forward order."""

    def __init__(self, updates: list[Update], name: str = "") -> None:
        super().__init__()
        self.updates = nn.ModuleList(updates)
        self.name = name

    def forward(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> list[torch.Tensor]:
        streams = list(streams)
        for u in self.updates:
            streams[u.target] = u.combine(streams, u.run(streams, ctx))
        return streams


class RevStack(nn.Module):
    """A run of reversible layers between a split and a merge of the hidden state."""

    def __init__(self, layers: list[RevLayer], split: str, options: RuntimeOptions) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.split = split
        self.options = options
        self.stats: dict[str, tuple[int, float]] = {}  # fixed-point iterations, residual

    def _params(self) -> list[torch.nn.Parameter]:
        seen: dict[int, torch.nn.Parameter] = {}
        for p in self.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def forward(self, hidden: torch.Tensor, **ctx: Any) -> torch.Tensor:
        streams = list(SPLITS[self.split](hidden))
        wide = self.options.stream_dtype
        wide = wide if wide is not None and wide != hidden.dtype else None
        for layer in self.layers:
            for u in layer.updates:
                u.compute_dtype = hidden.dtype if wide is not None else None
        if wide is not None:
            streams = [s.to(wide) for s in streams]
        params = self._params()
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
        # eval mode and no_grad run the layers as plain modules (nothing to save memory for)
        if self.options.plain_autograd or not needs_grad or not self.training:
            for layer in self.layers:
                streams = layer(streams, ctx)
        else:
            from .function import run_reversible

            streams = run_reversible(self, streams, ctx, params)
        return MERGES[self.split](*streams).to(hidden.dtype)


class Checkpointed(nn.Module):
    """A layer left out of the reversible stacks, run under activation checkpointing."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.layer(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.layer, *args, use_reentrant=False, **kwargs)
