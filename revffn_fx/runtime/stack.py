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

from .bits import pack_bits, unpack_bits
from .router import RouterTap
from .streams import MERGES, SPLITS, WRITTEN_LAST


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
    # exact reconstruction for scaled updates (momentum, meft, bdia): the float64 streams
    # are kept on a fixed-point grid of 2**-EXACT_GRID_BITS, where adding is exact and
    # keeping g = 2**-k of a stream drops exactly k low bits, which the forward stores
    # (packed: k/8 bytes per element per scaled update) for the backward to put back
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
        # set by RevStack.forward with exact_streams: the fixed-point grid's bits
        self.grid: int | None = None

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

    def run(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> torch.Tensor:
        xs = [streams[i] for i in self.reads]
        if self.compute_dtype is not None:
            xs = [x.to(self.compute_dtype) for x in xs]
        return self.branch(*xs, **{k: ctx[k] for k in self.ctx_names})

    def combine(self, streams: list[torch.Tensor], out: torch.Tensor,
                lost: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The new value of the target stream, given the branch output ``out``. With a
        grid (exact_streams) the bits the scale drops are appended to ``lost``."""
        old = streams[self.target]
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

    def invert(self, new: torch.Tensor, out: torch.Tensor, lost: torch.Tensor | None = None,
               streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The old value of the target stream from its new value and the branch output
        (exactly, with a grid and the bits :meth:`combine` stored)."""
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


def check_params(stack: RevStack, adopt: bool = True) -> None:
    """Refuse parameters the stack cannot train correctly (wrappers it does not drive)."""
    from ..errors import RevFFNError

    units = stack.options.shard_units
    n = 0
    for layer in stack.layers:
        for u in layer.updates:
            for m in u.branch.modules():
                for name, p in m.named_parameters(recurse=False):
                    n += 1
                    if getattr(p, "_fsdp_flattened", False):
                        raise RevFFNError(
                            "a RevModel under FSDP1 (FullyShardedDataParallel) is not "
                            "supported: its flattened parameters bypass the reversible "
                            "backward; shard with revffn_fx.distributed.shard(rev) (FSDP2)")
                    if type(p).__name__ == "DTensor" and m not in units:
                        if adopt and stack.options.find_units is not None:
                            stack.options.find_units()  # fully_shard applied by others
                            return check_params(stack, adopt=False)
                        raise RevFFNError(
                            f"parameter {name!r} of {type(m).__name__} is a DTensor that "
                            "revffn-fx did not shard: fully_shard applied to modules inside "
                            "a RevModel does not reach the reversible stacks (they call the "
                            "branch modules directly); use revffn_fx.distributed.shard(rev)")
    if n == 0:
        raise RevFFNError(
            "the reversible stack finds no parameters in its layers' modules: the model is "
            "under a wrapper that removed them (FSDP1 with flat parameters?); shard with "
            "revffn_fx.distributed.shard(rev) (FSDP2) or use DDP")


def unshard(units: list[Any], prefetch: list[Any] | None = None) -> None:
    """All-gather ``units`` (waiting for an all-gather issued earlier), then issue the
    all-gather of ``prefetch`` (the next layer's units) without waiting, so it overlaps
    this layer's compute."""
    for unit in units:
        unit.unshard()
    for unit in prefetch or ():
        unit.unshard(async_op=True)


def reshard(units: list[Any], forward: bool = False) -> None:
    """Reshard; after the forward, as the unit's ``reshard_after_forward`` says."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    for unit in units:
        groups = unit._get_fsdp_state()._fsdp_param_groups
        for g in groups:
            if forward:  # FSDPParamGroup.reshard honours reshard_after_forward in FORWARD
                g._training_state = TrainingState.FORWARD
            g.reshard()
            g._training_state = TrainingState.IDLE


def reduce_grads(units: list[Any], sink: Any = None) -> None:
    """A layer's backward is complete: reduce-scatter its units' gradients (FSDP2's
    post-backward: accumulate, reshard, reduce-scatter into the sharded ``.grad``), then
    hand each sharded parameter with a reduced gradient to ``sink``."""
    for unit in units:
        for g in unit._get_fsdp_state()._fsdp_param_groups:
            g.post_backward()
            if sink is None:
                continue
            g._wait_for_post_backward()  # the reduce-scatter's stream, before stepping
            for fp in g.fsdp_params:
                if fp.grad_offload_event is not None:  # CPU offload: the D2H copy
                    fp.grad_offload_event.synchronize()
                    fp.grad_offload_event = None
                if fp.sharded_param.grad is not None:
                    sink(fp.sharded_param)


class RevStack(nn.Module):
    """A run of reversible layers between a split and a merge of the hidden state."""

    def __init__(self, layers: list[RevLayer], split: str, options: RuntimeOptions) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.split = split
        self.options = options
        self.stats: dict[str, tuple[int, float]] = {}  # fixed-point iterations, residual

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
        wide = self.options.stream_dtype
        if wide is None:  # the rule: one step wider than the hidden state
            wide = torch.float64 if hidden.dtype in (torch.float32, torch.float64) \
                else torch.float32
        wide = wide if wide != hidden.dtype else None
        for i, layer in enumerate(self.layers):
            for j, u in enumerate(layer.updates):
                u.compute_dtype = hidden.dtype if wide is not None else None
                u.grid = None
                u.first_in_stack = i == 0 and j == 0  # bdia: no state before it
                u.sampling = self.training and torch.is_grad_enabled()
        if wide is not None:
            streams = [s.to(wide) for s in streams]
        # the grid serves a reconstruction: only in training with gradients (eval keeps the
        # plain arithmetic; bdia's eval is then the original layers bit for bit)
        if self.options.exact_streams and self.training and torch.is_grad_enabled():
            grid_for(self, streams)
            streams = round_to_grid(streams)
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
            from ..errors import RevFFNError

            raise RevFFNError("plain_autograd with gradients is not supported on a sharded "
                              "RevModel (the layers' parameters are resharded after each "
                              "layer); compare against an unsharded copy")
        # eval mode and no_grad run the layers as plain modules (nothing to save memory
        # for); a sharded model with gradients always takes the generated backward, the
        # path that gathers each layer's parameters again for its backward
        if self.options.plain_autograd or not needs_grad or (not self.training
                                                              and not sharded):
            for layer in self.layers:
                units = layer.units(self.options)
                unshard(units)
                streams = layer(streams, ctx)
                reshard(units)
        else:
            from .function import run_reversible

            streams = run_reversible(self, streams, ctx, params)
        if self.split in WRITTEN_LAST:  # the stream the stack's last update wrote
            return streams[self.layers[-1].updates[-1].target].to(hidden.dtype)
        return MERGES[self.split](*streams).to(hidden.dtype)


EXACT_GRID_BITS = 32  # streams on multiples of 2**-32: exact while |stream| < 2**20


def grid_for(stack: RevStack, streams: list[torch.Tensor]) -> None:
    from ..errors import RevFFNError

    if any(s.dtype != torch.float64 for s in streams):
        raise RevFFNError("exact_streams needs float64 streams: pass stream_dtype='float64' "
                          "(or a float64 model)")
    for layer in stack.layers:
        for u in layer.updates:
            m = 1 / getattr(u, "magnitude", u.scale)
            if u.scaled and not (m == round(m) and round(m) & (round(m) - 1) == 0):
                raise RevFFNError(f"exact_streams needs a scale of 2**-k, got {u.scale} "
                                  "(momentum=0.5, 0.25, 0.125, ...)")
            u.grid = EXACT_GRID_BITS


def round_to_grid(streams: list[torch.Tensor]) -> list[torch.Tensor]:
    s = 2.0 ** EXACT_GRID_BITS
    out = []
    for x in streams:
        q = torch.round(x.detach() * s) / s
        out.append(q if not x.requires_grad else x + (q - x).detach())
    return out


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
