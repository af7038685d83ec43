"""Reversible stacks: the modules the compiler's output runs on.

A stack is a run of reversible layers (``layers.py``) between a split of the hidden state
into streams and a merge. The forward of a stack keeps only its final streams; the backward
(``function.py``) walks the updates in reverse, reconstructing each stream and recomputing
each branch once. Also here: the checkpointed layers left out (the exact-streams grid is
``grid.py``).
This module knows nothing of torch.fx: a branch is any callable module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import RevFFNError
from .chunking import ChunkedForwards
from .function import run_reversible
from .grid import Grid, choose_grid, round_to_grid
from .layers import RevLayer, RuntimeOptions, wider_stream_dtype
from .sharding import check_params, reshard, unshard
from .streams import MERGES, SPLITS, WRITTEN_LAST


class RevStack(nn.Module):
    """A run of reversible layers between a split and a merge of the hidden state."""

    def __init__(self, layers: list[RevLayer], split: str, options: RuntimeOptions) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.split = split
        self.options = options
        self.stats: dict[str, tuple[int, float]] = {}  # fixed-point iterations, residual
        self.grid: Grid | None = None  # this call's exact-streams grid (runtime/grid.py)
        # its streams once left the int32 grid's range: float64 values from then on
        self.int_overflow = False

    def _params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters passed through the autograd Function (so DDP's and the
        optimizer's hooks see ordinary gradients); those of FSDP2 units are not: the
        backward finds them on their modules and FSDP2 reduces them."""
        units = self.options.shard_units
        seen: dict[int, torch.nn.Parameter] = {}
        for layer in self.layers:
            for u in layer.updates:
                for m in u.branch.modules():
                    if m in units:
                        continue
                    for p in m.parameters(recurse=False):
                        if p.requires_grad:
                            seen.setdefault(id(p), p)
        return list(seen.values())

    def forward(self, hidden: torch.Tensor, **ctx: Any) -> torch.Tensor:
        streams = list(SPLITS[self.split](hidden))
        # the grid serves a reconstruction: only in training with gradients (eval keeps the
        # plain arithmetic; bdia's eval is then the original layers bit for bit)
        grid = None
        if self.options.exact_streams and self.training and torch.is_grad_enabled():
            grid = choose_grid(self.options.stream_dtype, hidden.dtype, hidden.device.type)
            wide = grid.carrier
        else:
            wide = self.options.stream_dtype
            if wide is None or wide == torch.int32:  # the rule: one step wider
                wide = wider_stream_dtype(hidden.dtype)
        self.grid = grid
        if grid is not None:
            check_grid_scales(self)
        wide = wide if wide != hidden.dtype else None
        for i, layer in enumerate(self.layers):
            for j, u in enumerate(layer.updates):
                u.compute_dtype = hidden.dtype if wide is not None else None
                u.grid = None if grid is None else grid.bits
                u.view_dtype = None if grid is None else grid.view_dtype
                u.first_in_stack = i == 0 and j == 0  # bdia: no state before it
                u.sampling = self.training and torch.is_grad_enabled()
        if wide is not None:
            streams = [s.to(wide) for s in streams]
        if grid is not None:
            streams = round_to_grid(streams, grid)
        check_params(self)
        params = self._params()
        sharded = bool(self.options.shard_units)
        if sharded and torch.is_grad_enabled():
            # the sharded parameters are not Function inputs: this leaf makes autograd run
            # the generated backward even when neither the hidden state nor any other
            # parameter needs a gradient
            params.append(torch.empty(0, device=hidden.device, requires_grad=True))
        needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
        if self.options.plain_autograd and needs_grad and sharded:
            raise RevFFNError("plain_autograd with gradients is not supported on a sharded "
                              "RevModel (the layers' parameters are resharded after each "
                              "layer); compare against an unsharded copy")
        # eval mode and no_grad run the layers as plain modules (nothing to save memory
        # for); a sharded model with gradients always takes the generated backward, the
        # path that gathers each layer's parameters again for its backward
        if self.options.plain_autograd or not needs_grad or (not self.training
                                                              and not sharded):
            if grid is not None and grid.int_units:  # the same numbers, as float64 values
                streams = [s.to(torch.float64) for s in streams]
            for layer in self.layers:
                units = layer.units(self.options)
                unshard(units)
                streams = layer(streams, ctx)
                reshard(units)
            if grid is not None:  # handed on as the generated backward hands them on
                streams = [s.to(grid.carrier) for s in streams]
        else:
            streams = run_reversible(self, streams, ctx, params)
        if self.split in WRITTEN_LAST:  # the stream the stack's last update wrote
            return streams[self.layers[-1].updates[-1].target].to(hidden.dtype)
        return MERGES[self.split](*streams).to(hidden.dtype)


def check_grid_scales(stack: RevStack) -> None:
    """Exact streams undo a scale g only when it is 2**-k (k bits dropped and stored)."""
    for layer in stack.layers:
        for u in layer.updates:
            m = 1 / getattr(u, "magnitude", u.scale)
            if u.scaled and not (m == round(m) and round(m) & (round(m) - 1) == 0):
                raise RevFFNError(f"exact_streams needs a scale of 2**-k, got {u.scale} "
                                  "(momentum=0.5, 0.25, 0.125, ...)")


class Checkpointed(nn.Module):
    """A layer left out of the reversible stacks, run under activation checkpointing; its
    token-wise submodules (``chunked``: the MoE block, an MLP) run in token chunks, each
    checkpointed again inside the recompute (runtime/chunking.py), so the layer's
    recompute holds one chunk's MoE working set, as a coupling's does."""

    def __init__(self, layer: nn.Module, chunked: ChunkedForwards | None = None) -> None:
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "chunked", chunked)  # not a submodule: the layer owns them

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self._run(*args, **kwargs)
        return checkpoint(self._run, *args, use_reentrant=False, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if self.chunked is None:
            return self.layer(*args, **kwargs)
        with self.chunked.active():
            return self.layer(*args, **kwargs)
