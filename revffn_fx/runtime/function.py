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
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import FixedPointError, RevFFNError
from . import rng
from .stack import RevLayer, RevStack, Update, branch_params, reduce_grads, reshard, unshard

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


def fixed_point(u: Update, y: list[torch.Tensor], ctx: dict[str, Any], iters: int,
                tol: float) -> tuple[torch.Tensor, int, float]:
    """Solve ``x = (y_t - f(..., x, ...)) / scale`` for the stream ``u`` updates (it reads
    itself).

    Starts at ``x = y_t``; returns (x, iterations, final relative residual). Stops early
    when the residual is not finite (diverged): further steps cannot help.
    """
    t = u.target
    x = y[t]
    residual = float("inf")
    for i in range(1, iters + 1):
        streams = list(y)
        streams[t] = x
        new = u.invert(y[t], u.run(streams, ctx))
        residual = float((new - x).norm() / x.norm().clamp_min(1e-30))
        x = new
        if residual <= tol or not math.isfinite(residual):
            return x, i, residual
    return x, iters, residual


def _updates(stack: RevStack) -> list[tuple[str, Update, RevLayer]]:
    return [(f"{layer.name}.{j}", u, layer) for layer in stack.layers
            for j, u in enumerate(layer.updates)]


class RevFunction(torch.autograd.Function):
    @staticmethod
    def forward(fctx: Any, stack: RevStack, ctx_leaves: list[Any], ctx_spec: Any,
                tensor_pos: list[int], n: int, n_ctx: int, *tensors: torch.Tensor) -> Any:
        streams = list(tensors[:n])
        ctx_t = tensors[n:n + n_ctx]
        ctx = _rebuild(ctx_leaves, ctx_spec, tensor_pos, ctx_t)
        opts = stack.options
        tap = opts.router_tap
        record = bool(opts.record_router_logits and tap is not None)
        devices = rng.cuda_devices(streams)
        states, counts, logits = [], [], []
        lost: list[torch.Tensor] = []  # exact_streams: the bits the scaled updates dropped
        layer_now, units = None, []
        layers = list(stack.layers)
        for _, u, layer in _updates(stack):
            if layer is not layer_now:  # FSDP2: gather one layer's parameters at a time
                reshard(units, forward=True)
                layer_now, units = layer, layer.units(opts)
                unshard(units, _next_units(layers, layer, 1, opts))
            states.append(rng.capture(devices))
            if record:
                with tap.recording() as rec:  # type: ignore[union-attr]
                    out = u.run(streams, ctx)
                counts.append(len(rec))
                logits.extend(rec)
            else:
                counts.append(0)
                out = u.run(streams, ctx)
            streams[u.target] = u.combine(streams, out, lost)
        reshard(units, forward=True)
        fctx.save_for_backward(*streams, *ctx_t, *lost)
        fctx.stack, fctx.n, fctx.n_ctx = stack, n, n_ctx
        fctx.ctx_meta = (ctx_leaves, ctx_spec, tensor_pos)
        fctx.params = tensors[n + n_ctx:]
        fctx.states, fctx.counts, fctx.record = states, counts, record
        fctx.amp = _autocast_state()
        return (*streams, *logits)

    @staticmethod
    def backward(fctx: Any, *grads: torch.Tensor | None) -> Any:
        stack: RevStack = fctx.stack
        n, n_ctx = fctx.n, fctx.n_ctx
        saved = fctx.saved_tensors
        y = [t.detach() for t in saved[:n]]
        ctx_in = [t.detach().requires_grad_(t.requires_grad) for t in saved[n:n + n_ctx]]
        lost = list(saved[n + n_ctx:])
        ctx = _rebuild(*fctx.ctx_meta, ctx_in)
        gy = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads[:n], y)]
        glog = list(grads[n:])
        params = fctx.params
        where = {id(p): i for i, p in enumerate(params)}
        pgrads: list[torch.Tensor | None] = [None] * len(params)
        cgrads: list[torch.Tensor | None] = [None] * n_ctx
        ctx_req = [i for i, t in enumerate(ctx_in) if t.requires_grad]
        updates = _updates(stack)
        ends = torch.tensor(fctx.counts).cumsum(0).tolist() if updates else []
        opts = stack.options
        sink = opts.grad_sink
        if sink is not None and opts.shard_units:
            raise RevFFNError("the fused optimizer was built before revffn_fx.distributed."
                              "shard(): build it after sharding, on the sharded model")
        if opts.backward_start is not None:
            opts.backward_start()
        # with a gradient sink (the optimizer fused into backward) a parameter's gradient
        # is handed over as soon as it is complete: after the first update (in forward
        # order) that uses it, so gradients of the whole stack never coexist. Parameters
        # are read from the branch modules now (module identity), not from the forward's
        # inputs: a wrapper may have swapped the parameter objects since.
        first_use: dict[int, int] = {}
        if sink is not None:
            for j, (_, u, _) in enumerate(updates):
                for p in branch_params(u):
                    first_use.setdefault(id(p), j)
        pending: dict[int, torch.Tensor] = {}  # sink path: partial gradients by id
        layer_now, units = None, []
        layers = list(stack.layers)
        for j in reversed(range(len(updates))):
            name, u, layer = updates[j]
            if layer is not layer_now:
                # FSDP2: the previous layer's gradients are complete: reduce-scatter them;
                # gather this layer's parameters for its reconstruction and recompute
                reduce_grads(units, opts.reduced_sink)
                layer_now, units = layer, layer.units(opts)
                unshard(units, _next_units(layers, layer, -1, opts))
            t = u.target
            with torch.no_grad(), rng.replay(fctx.states[j]), _autocast(fctx.amp):
                if not u.closed_form:
                    x_t, iters, res = fixed_point(u, y, ctx, opts.fixed_point_iters,
                                                  opts.fixed_point_tol)
                    stack.stats[name] = (iters, res)  # type: ignore[attr-defined]
                    opts.fixed_point_stats[name] = (iters, res)
                    logger.debug("%s: fixed point, %d iterations, residual %.3g", name,
                                 iters, res)
                    if not res <= opts.fixed_point_tol:  # NaN-safe
                        layer, _, k = name.rpartition(".")
                        raise FixedPointError(
                            f"layer {layer} (update {k}, stream {t}): the fixed-point "
                            f"reconstruction did not converge, residual {res:.3g} after "
                            f"{iters} iterations (tolerance {opts.fixed_point_tol:.1g}); the "
                            "branch is not a contraction in the stream it updates: use "
                            "attention='plain' or raise fixed_point_iters/fixed_point_tol")
                    y[t] = x_t
            with torch.enable_grad(), rng.replay(fctx.states[j]), _autocast(fctx.amp):
                reads = {i: y[i].detach().requires_grad_(True) for i in sorted(set(u.reads))}
                streams = [reads.get(i, y[i]) for i in range(n)]
                if fctx.record:
                    with stack.options.router_tap.recording() as rec:  # type: ignore[union-attr]
                        out = u.run(streams, ctx)
                else:
                    rec, out = [], u.run(streams, ctx)
            if u.closed_form:
                y[t] = u.invert(y[t], out, lost.pop() if u.keeps_bits else None).detach()
            outs, gouts = [out], [gy[t]]
            lo = ends[j] - fctx.counts[j]
            for k, logit in enumerate(rec):
                g = glog[lo + k]
                if g is not None:
                    outs.append(logit)
                    gouts.append(g)
            mine = branch_params(u)
            inputs = [reads[i] for i in sorted(reads)] + mine + [ctx_in[i] for i in ctx_req]
            got = torch.autograd.grad(outs, inputs, gouts, allow_unused=True)
            if u.scale != 1.0:  # the old target value reached the new one times scale
                gy[t] = gy[t] * u.scale
            k = 0
            for i in sorted(reads):
                if got[k] is not None:
                    gy[i] = gy[i] + got[k] if i != t else gy[t] + got[k]
                k += 1
            for p in mine:
                g = got[k]
                k += 1
                if g is None:
                    continue
                if sink is not None:
                    pending[id(p)] = g if id(p) not in pending else pending[id(p)] + g
                elif id(p) in where:  # through the Function: DDP's and .grad hooks see it
                    idx = where[id(p)]
                    pgrads[idx] = g if pgrads[idx] is None else pgrads[idx] + g
                else:
                    # swapped in by a wrapper since the forward (FSDP2's unsharded
                    # parameter): accumulate where its owner reduces it from
                    p.grad = g if p.grad is None else p.grad + g
            for i in ctx_req:
                g = got[k]
                k += 1
                if g is not None:
                    cgrads[i] = g if cgrads[i] is None else cgrads[i] + g
            if sink is not None:
                for p in mine:
                    if first_use.get(id(p)) == j and id(p) in pending:
                        sink(p, pending.pop(id(p)))
        reduce_grads(units, opts.reduced_sink)
        return (None,) * 6 + tuple(gy) + tuple(cgrads) + tuple(pgrads)


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


def run_reversible(stack: RevStack, streams: list[torch.Tensor], ctx: dict[str, Any],
                   params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Run ``stack`` on ``streams`` with the memory-saving backward."""
    leaves, spec = pytree.tree_flatten(ctx)
    pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    ctx_t = [leaves[i] for i in pos]
    n = len(streams)
    outs = RevFunction.apply(stack, leaves, spec, pos, n, len(ctx_t), *streams, *ctx_t, *params)
    tap = stack.options.router_tap
    if stack.options.record_router_logits and tap is not None and tap.active:
        tap.records.extend(outs[n:])
    return list(outs[:n])
