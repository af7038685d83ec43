"""Reversible layers: the additive (or scaled) updates a coupling is made of, and the
switches every stack of one model shares. A layer is a list of updates over streams,
``stream[target] = scale * stream[target] + branch(*stream[reads], **ctx)``, applied in
order; each update knows its inverse (the one the backward runs and rf.verify checks).
This module knows nothing of torch.fx: a branch is any callable module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .bits import pack_bits, unpack_bits
from .grid import check_units, drop_bits, from_units, put_back_bits, to_units
from .router import RouterTap


def wider_stream_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stream rule: one step wider than the hidden state (fp32 -> fp64, 16-bit -> fp32),
    so the additions of the couplings round no worse than autograd does."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


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
    # dtype the streams are carried in inside a stack (None: one step wider than the hidden
    # state that enters it, decided per call, so FSDP2 mixed precision and a model cast after
    # the transform follow the rule too). A wider dtype makes the additions of the couplings
    # (nearly) exact, so the backward's reconstruction does not accumulate rounding error
    # through large-gain branches; each branch still computes in the hidden state's dtype.
    stream_dtype: torch.dtype | None = None
    # token-wise branch modules (MoE blocks, MLPs) run on at most this many tokens at a time
    # when a call has more (0: never), each chunk checkpointed inside the generated
    # backward's recompute: at long context the MoE dispatch's working set, not the stored
    # boundaries, is the backward's peak (runtime/chunking.py)
    token_chunk: int = 4096
    # exact reconstruction for scaled updates (momentum, meft, bdia): the streams are kept
    # on a fixed-point grid (runtime/grid.py: int32 units of 2**-16 for 16-bit models,
    # float64 values on 2**-32 for fp32), where adding is exact and keeping g = 2**-k of a
    # stream drops exactly k low bits, which the forward stores (packed: k/8 bytes per
    # element per scaled update) for the backward to put back
    exact_streams: bool = False
    # the reconstruction guard (runtime/guard.py): "raise", "warn" or "off"
    guard: str = "raise"
    # FSDP2 units of the converted layers (revffn_fx.distributed.shard): every module inside
    # a unit -> the unit's FSDPModule. The stacks call the branch modules directly, so the
    # units' own forward hooks never fire: the stack unshards, reshards and reduces them.
    shard_units: dict[nn.Module, Any] = field(default_factory=dict)
    # called with a sharded parameter whose gradient has just been reduce-scattered (the
    # fused optimizer under FSDP2 steps it there)
    reduced_sink: Any = None
    # called once at the start of each generated backward (the fused optimizer under FSDP2
    # queues its step of the parameters FSDP reduces at the end of the backward)
    backward_start: Any = None
    # all-gather the next layer's FSDP2 units while this layer computes (two layers gathered)
    prefetch: bool = True
    # called when a layer's parameters turn out to be DTensors of FSDP2 units this model did
    # not register (fully_shard applied by the user or accelerate): registers them (set by
    # revffn_fx.distributed.check_wrappers when a graph is compiled)
    find_units: Any = None


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
        # set by RevStack.forward with exact_streams: the fixed-point grid's bits, and the
        # dtype branches read the streams in (float32 on the int32 grid; runtime/grid.py)
        self.grid: int | None = None
        self.view_dtype: torch.dtype | None = None

    @property
    def scaled(self) -> bool:
        """Its inverse divides (it keeps a fraction of the stream it overwrites)."""
        return self.scale != 1.0

    @property
    def factor(self) -> Any:
        """What the overwritten stream is multiplied by (the backward scales its gradient)."""
        return self.scale

    @property
    def keeps_bits(self) -> bool:
        """The forward stores the bits this update drops (exact_streams, scale < 1)."""
        return self.grid is not None and self.scale != 1.0

    def prepare(self, streams: list[torch.Tensor]) -> Any:
        """Anything this call draws before the branch runs (bdia's gamma); the backward
        gives it back through :meth:`restore`."""
        return None

    def restore(self, drawn: Any) -> None:
        """Put back what :meth:`prepare` drew for the call being undone."""

    @property
    def closed_form(self) -> bool:
        """The branch does not read the stream it updates: invert by subtraction."""
        return self.target not in self.reads

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """A stream as branches read it: int32 units as float32 values; on the int32 grid
        a float64 value converted to float32 too (the same number either way)."""
        if x.dtype == torch.int32:
            assert self.grid is not None, "int32 streams without a grid"
            return from_units(x, self.grid)
        if self.view_dtype is not None:
            return x.to(self.view_dtype)
        return x

    def run(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> torch.Tensor:
        xs = [self.view(streams[i]) for i in self.reads]
        if self.compute_dtype is not None:
            xs = [x.to(self.compute_dtype) for x in xs]
        return self.branch(*xs, **{k: ctx[k] for k in self.ctx_names})

    def combine(self, streams: list[torch.Tensor], out: torch.Tensor,
                lost: list[torch.Tensor] | None = None,
                flags: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The new value of the target stream, given the branch output ``out``. With a
        grid (exact_streams) the bits the scale drops are appended to ``lost``; on int32
        units, whether a value left the grid's range to ``flags``."""
        old = streams[self.target]
        if old.dtype == torch.int32:
            return self._combine_units(old, out, lost, flags)
        naive = (old if self.scale == 1.0 else old * self.scale) + out
        if self.grid is None:
            return naive
        s = 2.0 ** self.grid
        o = old.detach() * s  # an integer (the stream is on the grid)
        kept = o
        if self.scale != 1.0:
            m = round(1 / self.scale)
            dropped = torch.remainder(o, m)
            kept = (o - dropped) * self.scale
            if lost is not None:  # log2(m) bits per element, packed (runtime/bits.py)
                lost.append(pack_bits(dropped, m.bit_length() - 1))
        exact = (kept + torch.round(out.detach().to(o.dtype) * s)) / s
        if not naive.requires_grad:
            return exact
        return naive + (exact - naive).detach()  # the grid's rounding, gradient 1

    def _combine_units(self, old: torch.Tensor, out: torch.Tensor,
                       lost: list[torch.Tensor] | None,
                       flags: list[torch.Tensor] | None) -> torch.Tensor:
        """:meth:`combine` on int32 units: ``floor(old / m) + round(out * 2**grid)``, the
        integers the float64 arithmetic above computes (``>>`` floors, ``&`` is the
        non-negative remainder), so both hold the same stream."""
        assert self.grid is not None
        q = to_units(out, self.grid, flags)
        kept = old if self.scale == 1.0 else drop_bits(old, round(1 / self.scale), lost)
        new = kept + q
        check_units(new, flags)
        return new

    def invert(self, new: torch.Tensor, out: torch.Tensor, lost: torch.Tensor | None = None,
               streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The old value of the target stream from its new value and the branch output
        (exactly, with a grid and the bits :meth:`combine` stored)."""
        if new.dtype == torch.int32:
            assert self.grid is not None
            d = new - to_units(out, self.grid)
            if self.scale != 1.0:
                assert lost is not None, "exact_streams: the dropped bits were not stored"
                d = put_back_bits(d, round(1 / self.scale), lost)
            return d
        if self.grid is None:
            old = new - out
            return old if self.scale == 1.0 else old / self.scale
        s = 2.0 ** self.grid
        d = new * s - torch.round(out.detach().to(new.dtype) * s)
        if self.scale != 1.0:
            assert lost is not None, "exact_streams: the dropped bits were not stored"
            m = round(1 / self.scale)
            d = d * m + unpack_bits(lost, m.bit_length() - 1, d.shape).to(d.dtype)
        return d / s


class RevLayer(nn.Module):
    """One reversible coupling: its updates, in forward order."""

    def __init__(self, updates: list[Update], name: str = "") -> None:
        super().__init__()
        self.updates = nn.ModuleList(updates)
        self.name = name

    def forward(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> list[torch.Tensor]:
        streams = list(streams)
        for u in self.updates:
            u.prepare(streams)
            streams[u.target] = u.combine(streams, u.run(streams, ctx))
        return streams

    def units(self, options: RuntimeOptions) -> list[Any]:
        """The FSDP2 units (FSDPModules) holding the parameters of this layer's branches."""
        if not options.shard_units:
            return []
        out: dict[int, Any] = {}
        for u in self.updates:
            for m in u.branch.modules():
                unit = options.shard_units.get(m)
                if unit is not None:  # one per FSDP state: fully_shard([a, b]) shares it
                    out.setdefault(id(unit._get_fsdp_state()), unit)
        return list(out.values())


def branch_params(u: Update) -> list[torch.nn.Parameter]:
    """The trainable parameters a branch uses, read from its modules now (not remembered
    from an earlier call): a wrapper such as FSDP2 swaps the registered parameter objects
    between the forward and the backward."""
    return list({id(p): p for p in u.branch.parameters() if p.requires_grad}.values())
