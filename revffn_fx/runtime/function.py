"""The generated backward: one autograd Function per reversible stack.

Forward runs the updates under no_grad and saves only the stack's final streams and the
shared context tensors (mask, position embeddings). Backward walks the updates in reverse;
for ``y_t = x_t + f(x_reads)`` it recomputes ``f`` once with grad on, from the
reconstructed inputs, and that one recompute gives both ``x_t = y_t - f`` and the
gradients (RevNet / Reformer / RevViT). Randomness is replayed from the RNG state
recorded before each branch; autocast is restored as it was in forward. Router logits
produced inside the stack are outputs of the Function, so the load-balancing loss sends
its gradients into the recompute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import FixedPointError, RevFFNError
from . import grid as grids
from . import guard, rng
from .fixed_point import fixed_point
from .layers import RevLayer, Update, branch_params
from .sharding import reduce_grads, reshard, unshard

_AMP_DEVICES = ("cpu", "cuda")
logger = logging.getLogger(__name__)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AMP_DEVICES]


@contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with ExitStack() as stack:
        for dev, enabled, dtype in state:
            if enabled or torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(device_type=dev, dtype=dtype, enabled=enabled))
        yield


def _updates(stack: Any) -> list[tuple[str, Update, RevLayer]]:
    return [(f"{layer.name}.{j}", u, layer) for layer in stack.layers
            for j, u in enumerate(layer.updates)]


@dataclass
class _Pass:
    """What one forward pass over a stack leaves for the backward."""

    streams: list[torch.Tensor]
    record: bool
    states: list[Any] = field(default_factory=list)  # RNG state before each branch
    counts: list[int] = field(default_factory=list)  # router logits per update
    logits: list[torch.Tensor] = field(default_factory=list)
    lost: list[torch.Tensor] = field(default_factory=list)  # bits the scaled updates dropped
    prints: list[torch.Tensor] = field(default_factory=list)  # the guard's, per layer
    draws: list[Any] = field(default_factory=list)  # drawn before each branch (bdia's gamma)


def _float64(streams: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The streams as float64 values (the int32 grid's numbers, exactly)."""
    return [s.detach().to(torch.float64) for s in streams]


def _forward_pass(stack: Any, streams: list[torch.Tensor], ctx: dict[str, Any],
                  flags: list[torch.Tensor] | None) -> _Pass:
    """Run the stack's updates (no grad), keeping only what the backward needs."""
    opts = stack.options
    tap = opts.router_tap
    run = _Pass(streams, bool(opts.record_router_logits and tap is not None))
    devices = rng.cuda_devices(streams)
    layer_now, units = None, []
    layers = list(stack.layers)
    for _, u, layer in _updates(stack):
        if layer is not layer_now:  # FSDP2: gather one layer's parameters at a time
            reshard(units, forward=True)
            layer_now, units = layer, layer.units(opts)
            unshard(units, _next_units(layers, layer, 1, opts))
            if opts.guard != "off":
                run.prints.append(guard.fingerprint(streams))
        run.draws.append(u.prepare(streams))  # before the capture: the branch replays alone
        run.states.append(rng.capture(devices))
        if run.record:
            with tap.recording() as rec:  # type: ignore[union-attr]
                out = u.run(streams, ctx)
            run.counts.append(len(rec))
            run.logits.extend(rec)
        else:
            run.counts.append(0)
            out = u.run(streams, ctx)
        streams[u.target] = u.combine(streams, out, run.lost, flags)
    reshard(units, forward=True)
    return run


class RevFunction(torch.autograd.Function):
    @staticmethod
    def forward(fctx: Any, stack: Any, ctx_leaves: list[Any], ctx_spec: Any,
                tensor_pos: list[int], n: int, n_ctx: int, *tensors: torch.Tensor) -> Any:
        ctx_t = tensors[n:n + n_ctx]
        ctx = _rebuild(ctx_leaves, ctx_spec, tensor_pos, ctx_t)
        grid = stack.grid
        if grid is not None and grid.int_units and not stack.int_overflow:
            # int32 units (4 bytes); a step whose streams leave their range runs again, on
            # float64 values of the same grid, from the same RNG state, and so does every
            # later step of this stack (runtime/grid.py)
            start = rng.capture(rng.cuda_devices(list(tensors[:n])))
            flags: list[torch.Tensor] = []
            streams = [grids.to_units(s, grid.bits, flags) for s in tensors[:n]]
            run = _forward_pass(stack, streams, ctx, flags)
            if grids.out_of_range(flags):
                stack.int_overflow = True
                grids.warn_fallback(f"the reversible stack from layer "
                                    f"{stack.layers[0].name}", grid)
                with rng.replay(start):
                    run = _forward_pass(stack, _float64(tensors[:n]), ctx, None)
        elif grid is not None and grid.int_units:  # overflowed before: float64 values
            run = _forward_pass(stack, _float64(tensors[:n]), ctx, None)
        else:
            run = _forward_pass(stack, list(tensors[:n]), ctx, None)
        streams = run.streams
        fctx.save_for_backward(*streams, *ctx_t, *run.lost)
        fctx.stack, fctx.n, fctx.n_ctx = stack, n, n_ctx
        fctx.ctx_meta = (ctx_leaves, ctx_spec, tensor_pos)
        fctx.params = tensors[n + n_ctx:]
        fctx.states, fctx.counts, fctx.record = run.states, run.counts, run.record
        fctx.prints, fctx.draws = run.prints, run.draws
        fctx.amp = _autocast_state()
        if grid is not None:  # handed on in the carrier dtype (float32 on the int32 grid)
            outs = [grids.from_units(s, grid.bits, grid.carrier) if s.dtype == torch.int32
                    else s.to(grid.carrier) for s in streams]
        else:
            outs = streams
        return (*outs, *run.logits)

    @staticmethod
    def backward(fctx: Any, *grads: torch.Tensor | None) -> Any:
        """Walk the updates in reverse. For ``y_t = scale * x_t + f(x_reads)``, with
        ``gy = dL/dy``: reconstruct ``x``, recompute ``f`` with grad on, propagate
        ``dL/dx`` through it, deliver the parameter and context gradients."""
        walk = _Walk(fctx, grads)
        layer_now = None
        for j in reversed(range(len(walk.updates))):
            name, u, layer = walk.updates[j]
            if layer is not layer_now:
                walk.next_layer(layer)
                layer_now = layer
            walk.reconstruct_by_fixed_point(j, name, u)
            reads, out, logits = walk.recompute(j, u)
            if u.closed_form:
                walk.reconstruct_closed_form(u, out)
            walk.guard(j, layer)
            param_grads, ctx_grads = walk.propagate(j, u, reads, out, logits)
            walk.deliver(j, u, param_grads, ctx_grads)
        return walk.finish()


#: RevFunction.forward's inputs before the tensors (stack, ctx_leaves, ctx_spec,
#: tensor_pos, n, n_ctx): not differentiable, their gradients are None
_NON_TENSOR_INPUTS = 6


class _Walk:
    """The state of one backward walk over a stack: the streams ``y`` (reconstructed into
    the layer inputs as the walk goes), ``gy`` (dL/d of those streams), the gradients of
    the context tensors and parameters, and the gradient sink's bookkeeping."""

    def __init__(self, fctx: Any, grads: tuple[torch.Tensor | None, ...]) -> None:
        self.fctx, self.stack, self.opts = fctx, fctx.stack, fctx.stack.options
        n, n_ctx = fctx.n, fctx.n_ctx
        saved = fctx.saved_tensors
        self.y = [t.detach() for t in saved[:n]]
        self.ctx_in = [t.detach().requires_grad_(t.requires_grad)
                       for t in saved[n:n + n_ctx]]
        self.lost = list(saved[n + n_ctx:])  # exact_streams: bits to put back, last first
        self.ctx = _rebuild(*fctx.ctx_meta, self.ctx_in)
        self.gy = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[:n], self.y)]
        self.g_logits = list(grads[n:])  # router logits' gradients (load-balancing loss)
        self.where = {id(p): i for i, p in enumerate(fctx.params)}
        self.param_grads: list[torch.Tensor | None] = [None] * len(fctx.params)
        self.ctx_grads: list[torch.Tensor | None] = [None] * n_ctx
        self.ctx_req = [i for i, t in enumerate(self.ctx_in) if t.requires_grad]
        self.updates = _updates(self.stack)
        self.logit_ends = torch.tensor(fctx.counts).cumsum(0).tolist() if self.updates else []
        self.layers, self.units = list(self.stack.layers), []
        self.sink = self.opts.grad_sink
        if self.sink is not None and self.opts.shard_units:
            raise RevFFNError("the fused optimizer was built before revffn_fx.distributed."
                              "shard(): build it after sharding, on the sharded model")
        if self.opts.backward_start is not None:
            self.opts.backward_start()
        # with a gradient sink (the optimizer fused into backward) a parameter's gradient
        # is handed over as soon as it is complete: after the first update (in forward
        # order) that uses it, so gradients of the whole stack never coexist. Parameters
        # are read from the branch modules now (module identity), not from the forward's
        # inputs: a wrapper may have swapped the parameter objects since.
        self.first_use: dict[int, int] = {}
        if self.sink is not None:
            for j, (_, u, _) in enumerate(self.updates):
                for p in branch_params(u):
                    self.first_use.setdefault(id(p), j)
        self.pending: dict[int, torch.Tensor] = {}  # sink path: partial gradients by id
        # the guard: each layer's first update (walking back, its input is then rebuilt)
        # and its place among the forward's fingerprints
        self.first_update: dict[int, int] = {}
        self.layer_pos: dict[int, int] = {}
        for j, (_, _, layer) in enumerate(self.updates):
            if id(layer) not in self.first_update:
                self.first_update[id(layer)] = j
                self.layer_pos[id(layer)] = len(self.layer_pos)

    def next_layer(self, layer: RevLayer) -> None:
        """FSDP2: the previous layer's gradients are complete: reduce-scatter them; gather
        this layer's parameters for its reconstruction and recompute."""
        reduce_grads(self.units, self.opts.reduced_sink)
        self.units = layer.units(self.opts)
        unshard(self.units, _next_units(self.layers, layer, -1, self.opts))

    def guard(self, j: int, layer: RevLayer) -> None:
        """Once a layer's input is reconstructed (its first update undone), compare its
        fingerprint with the forward's (runtime/guard.py)."""
        if (self.opts.guard == "off" or j != self.first_update[id(layer)]
                or not self.fctx.prints):  # the forward ran with the guard off
            return
        before = self.fctx.prints[self.layer_pos[id(layer)]]
        fp = [u for u in layer.updates if not u.closed_form]
        # int32 units are exact: judged as float32 streams (what branches read them as)
        stream = self.y[0].dtype if self.y[0].is_floating_point() else torch.float32
        compute = layer.updates[0].compute_dtype or stream
        tol = guard.tolerance(stream, compute, self.opts.fixed_point_tol if fp else None)
        scaled = any(u.scaled for u in layer.updates)
        if scaled and not self.opts.exact_streams:
            hint = "the scaled coupling's inverse divides by g: use exact_streams=True"
        elif fp:
            hint = ("its fixed point reconstructs the input only approximately: use "
                    "attention='plain', or raise fixed_point_iters")
        else:
            hint = ("the recompute did not reproduce the forward: a compiler that rewrote the "
                    "reversible stack, a nondeterministic user pass, or an unsupported "
                    "wrapper; compare with rev.plain_autograd(), or set guard='warn'")
        guard.check(layer.name, before, guard.fingerprint(self.y), tol, self.opts.guard, hint)

    def _replayed(self, j: int) -> ExitStack:
        """Update ``j``'s forward conditions: its RNG state and the autocast state."""
        scope = ExitStack()
        scope.enter_context(rng.replay(self.fctx.states[j]))
        scope.enter_context(_autocast(self.fctx.amp))
        return scope

    def reconstruct_by_fixed_point(self, j: int, name: str, u: Update) -> None:
        """``x_t = (y_t - f(x_reads)) / scale`` when ``f`` reads ``x_t`` itself: solved by
        fixed-point iteration before the recompute (closed-form updates invert after it)."""
        if u.closed_form:
            return
        opts, t = self.opts, u.target
        with torch.no_grad(), self._replayed(j):
            x_t, iters, res = fixed_point(u, self.y, self.ctx, opts.fixed_point_iters,
                                          opts.fixed_point_tol)
        self.stack.stats[name] = (iters, res)  # type: ignore[attr-defined]
        opts.fixed_point_stats[name] = (iters, res)
        logger.debug("%s: fixed point, %d iterations, residual %.3g", name, iters, res)
        if not res <= opts.fixed_point_tol:  # NaN-safe
            layer, _, k = name.rpartition(".")
            raise FixedPointError(
                f"layer {layer} (update {k}, stream {t}): the fixed-point reconstruction did "
                f"not converge, residual {res:.3g} after {iters} iterations (tolerance "
                f"{opts.fixed_point_tol:.1g}); the branch is not a contraction in the stream "
                "it updates: use attention='plain' or raise fixed_point_iters/fixed_point_tol")
        self.y[t] = x_t

    def recompute(self, j: int, u: Update) -> tuple[dict[int, torch.Tensor], torch.Tensor,
                                                     list[torch.Tensor]]:
        """``f(x_reads)`` again, with grad on, in the forward's RNG and autocast state:
        (the inputs it reads, as leaves; its output; the router logits it produced)."""
        u.restore(self.fctx.draws[j])
        with torch.enable_grad(), self._replayed(j):
            # the streams as the branch reads them (int32 units: float32 values), as leaves
            reads = {i: u.view(self.y[i]).detach().requires_grad_(True)
                     for i in sorted(set(u.reads))}
            streams = [reads.get(i, y) for i, y in enumerate(self.y)]
            if self.fctx.record:
                with self.opts.router_tap.recording() as logits:  # type: ignore[union-attr]
                    out = u.run(streams, self.ctx)
            else:
                logits, out = [], u.run(streams, self.ctx)
        return reads, out, logits

    def reconstruct_closed_form(self, u: Update, out: torch.Tensor) -> None:
        """``x_t = (y_t - f(x_reads)) / scale`` from the recompute's ``f`` (and, on the
        exact-streams grid, the bits the forward's division dropped)."""
        t = u.target
        self.y[t] = u.invert(self.y[t], out, self.lost.pop() if u.keeps_bits else None,
                             self.y).detach()

    def propagate(self, j: int, u: Update, reads: dict[int, torch.Tensor], out: torch.Tensor,
                  logits: list[torch.Tensor]) -> tuple[list[Any], list[Any]]:
        """``dL/dx_i = dL/dy_i + (df/dx_i)^T dL/dy_t`` for the streams ``f`` reads, and
        ``dL/dx_t = scale * dL/dy_t + ...`` for the one it writes; returns the gradients
        of the branch parameters and of the context tensors (one vector-Jacobian product,
        the router logits' gradients included)."""
        t = u.target
        outs, g_outs = [out], [self.gy[t]]
        first = self.logit_ends[j] - self.fctx.counts[j]
        for k, logit in enumerate(logits):
            if self.g_logits[first + k] is not None:
                outs.append(logit)
                g_outs.append(self.g_logits[first + k])
        params = branch_params(u)
        order = sorted(reads)
        inputs = [reads[i] for i in order] + params + [self.ctx_in[i] for i in self.ctx_req]
        got = torch.autograd.grad(outs, inputs, g_outs, allow_unused=True)
        if u.scaled:  # the old target value reached the new one times the factor
            self.gy[t] = self.gy[t] * u.factor
        for i, g in zip(order, got):
            if g is not None:
                self.gy[i] = self.gy[i] + g
        return list(zip(params, got[len(order):len(order) + len(params)])), \
            list(got[len(order) + len(params):])

    def deliver(self, j: int, u: Update, param_grads: list[tuple[Any, Any]],
                ctx_grads: list[Any]) -> None:
        """Hand the branch's parameter gradients on (the fused optimizer's sink once
        complete, else through the Function's outputs, else ``.grad`` of a parameter a
        wrapper swapped in) and accumulate the context tensors' gradients."""
        for p, g in param_grads:
            if g is None:
                continue
            if self.sink is not None:
                self.pending[id(p)] = g if id(p) not in self.pending else self.pending[id(p)] + g
            elif id(p) in self.where:  # through the Function: DDP's and .grad hooks see it
                k = self.where[id(p)]
                self.param_grads[k] = g if self.param_grads[k] is None else \
                    self.param_grads[k] + g
            else:  # FSDP2's unsharded parameter: accumulate where its owner reduces it
                p.grad = g if p.grad is None else p.grad + g
        for i, g in zip(self.ctx_req, ctx_grads):
            if g is not None:
                self.ctx_grads[i] = g if self.ctx_grads[i] is None else self.ctx_grads[i] + g
        if self.sink is not None:
            for p, _ in param_grads:
                if self.first_use.get(id(p)) == j and id(p) in self.pending:
                    self.sink(p, self.pending.pop(id(p)))

    def finish(self) -> tuple[torch.Tensor | None, ...]:
        """The last layer's gradients reduced; the Function's input gradients, in order."""
        reduce_grads(self.units, self.opts.reduced_sink)
        return ((None,) * _NON_TENSOR_INPUTS + tuple(self.gy) + tuple(self.ctx_grads)
                + tuple(self.param_grads))


def _next_units(layers: list[Any], layer: Any, step: int, opts: Any) -> list[Any]:
    """The FSDP2 units of the layer after ``layer`` in walking order (``step`` 1: forward,
    -1: backward), to prefetch; none at the end of the stack or without prefetching."""
    if not (opts.prefetch and opts.shard_units):
        return []
    i = next(k for k, lay in enumerate(layers) if lay is layer) + step
    return layers[i].units(opts) if 0 <= i < len(layers) else []


def _rebuild(leaves: list[Any], spec: Any, pos: list[int], tensors: Any) -> dict[str, Any]:
    leaves = list(leaves)
    for i, t in zip(pos, tensors):
        leaves[i] = t
    return pytree.tree_unflatten(leaves, spec)


@torch.compiler.disable(recursive=True)
def run_reversible(stack: Any, streams: list[torch.Tensor], ctx: dict[str, Any],
                   params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Run ``stack`` on ``streams`` with the memory-saving backward.

    Opaque to torch.compile on purpose (a graph break): the backward rebuilds each layer's
    input by recomputing its branches eagerly, which undoes the forward exactly only if the
    forward ran the same kernels; inductor fusing the forward differently (measured: momentum
    gradients off by 0.6) would make the reconstruction wrong. Everything around the stacks
    (embeddings, head, loss) still compiles."""
    leaves, spec = pytree.tree_flatten(ctx)
    pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    ctx_t = [leaves[i] for i in pos]
    n = len(streams)
    outs = RevFunction.apply(stack, leaves, spec, pos, n, len(ctx_t), *streams, *ctx_t, *params)
    tap = stack.options.router_tap
    if stack.options.record_router_logits and tap is not None and tap.active:
        tap.records.extend(outs[n:])
    return list(outs[:n])
