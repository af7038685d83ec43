"""verify: check a RevModel's generated backward against ordinary autograd.

Three checks on one batch:
- reconstruction: for every reversible layer, the runtime's own inverse (the one the
  backward runs: closed form, fixed point, the stored bits of exact streams) applied to its
  outputs gives back its inputs, within the run-time guard's tolerance (per layer);
- gradients: the loss (plus the load-balancing loss when asked) differentiated through
  the generated backward, from the same RNG seed, meets the exactness criterion
  (checks/exactness.py): its error against float64 of the same function is at most
  max(1.5 x, + slack) that of plain autograd in the training dtype, so rounding autograd
  makes too never fails it and a wrong backward never passes; every parameter that gets a
  gradient from autograd gets one from the generated backward;
- fidelity: the branches the rewrite extracted from each layer, recomposed in the original
  residual form (one residual state, adapters as identities), reproduce the original
  layer's output. The two checks above compare the coupled model with itself; this one
  catches a rewrite that dropped or altered a computation of the original layer.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..frontend.outputs import logits_and_loss
from ..model import RevModel
from ..model_setup import input_embeddings
from ..runtime import guard
from ..runtime.fixed_point import fixed_point
from ..runtime.grid import choose_grid, round_to_grid, to_units
from ..runtime.stack import RevStack
from ..runtime.streams import MERGES
from .exactness import float64_copy, relative_error, tolerance, worst_parameter

# with fixed-point reconstructions (cross-branch attention) in fp64: the fixed point is only
# as exact as the branch itself, and HF RMSNorms compute in fp32 even for fp64 inputs
# (measured 4e-9 - 1e-8 on tiny mixtral; 1e-15 with fp64 norms): the gradient bound
FIXED_POINT_GRAD_TOL = 1e-7
EMBEDDINGS = "<input embeddings>"  # the gradient of the embedding output, checked too
# the recomposed branches run the same operations in the same order as the original layer
FIDELITY_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}


@dataclass
class LayerCheck:
    index: int
    qualname: str
    reconstruction_err: float
    # recomposed branches vs the original layer (relative); None when not checked
    fidelity_err: float | None = None


@dataclass(repr=False)
class VerifyReport:
    """The outcome of :func:`verify`; ``ok`` when every error is within tolerance."""

    ok: bool
    max_grad_rel_err: float
    worst_param: str
    embedding_grad_rel_err: float
    loss: float
    layers: list[LayerCheck] = field(default_factory=list)
    grad_tol: float = 0.0
    recon_tol: float = 0.0
    dtype: str = ""
    # "<layer>.<update>" -> (iterations, final relative residual) of each fixed-point
    # reconstruction in the checked backward; empty without cross-branch attention
    fixed_point: dict[str, tuple[int, float]] = field(default_factory=dict)
    fidelity_tol: float = 0.0
    # plain autograd's gradient error in the training dtype against float64 of the same
    # function: what the criterion's bound (grad_tol) is built from
    autograd_err: float = 0.0

    def __repr__(self) -> str:
        return f"VerifyReport({self.summary()})"

    def __str__(self) -> str:
        """The summary and one line per reversible layer."""
        lines = [self.summary()] + [
            f"  layer {c.index} ({c.qualname}): reconstruction error "
            f"{c.reconstruction_err:.2e}" for c in self.layers]
        return "\n".join(lines)

    def summary(self) -> str:
        rec = max((c.reconstruction_err for c in self.layers), default=0.0)
        fp = ""
        if self.fixed_point:
            its = [n for n, _ in self.fixed_point.values()]
            res = max(r for _, r in self.fixed_point.values())
            fp = (f"; fixed point {min(its)}-{max(its)} iterations, max residual {res:.1e} "
                  f"over {len(its)} layers")
        fids = [c.fidelity_err for c in self.layers if c.fidelity_err is not None]
        fid = (f", max fidelity error {max(fids):.2e} (tol {self.fidelity_tol:.0e})"
               if fids else "")
        return (f"{'OK' if self.ok else 'FAILED'}: gradient error {self.max_grad_rel_err:.2e} "
                f"against float64 of the same function (autograd in {self.dtype} "
                f"{self.autograd_err:.1e}; bound {self.grad_tol:.1e}; worst {self.worst_param}), "
                f"max reconstruction error {rec:.2e} (tol {self.recon_tol:.1e}){fid} over "
                f"{len(self.layers)} reversible layers, dtype {self.dtype}{fp}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def _grads(rev: RevModel, input_ids: torch.Tensor, kw: dict[str, Any], seed: int,
           router: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and every gradient (float64), the embedding output's under
    :data:`EMBEDDINGS` (when it requires grad: with frozen embeddings it does not)."""
    emb = input_embeddings(rev.model)
    box: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.retain_grad()
            box.append(out)

    handle = emb.register_forward_hook(keep) if emb is not None else None
    try:
        rev.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = rev(input_ids, output_router_logits=router, **kw)
        logits, loss = logits_and_loss(out)  # hand-written models return their own structure
        loss = loss if loss is not None else logits.float().pow(2).mean()
        loss.backward()
    finally:
        if handle is not None:
            handle.remove()
    grads = {n: p.grad.detach().double().clone() for n, p in rev.named_parameters()
             if p.grad is not None}
    if box and box[0].grad is not None:
        grads[EMBEDDINGS] = box[0].grad.detach().double().clone()
    rev.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


class _Recomposed(fx.Interpreter):
    """Run a coupling graph as the original residual layer: both streams read as one
    residual state, adapters as identities, every stream update ``stream + u`` as the
    residual add ``state + u`` in graph order, the merge as the final state.

    Relies on the tags the coupling pass puts on the nodes it adds (``node.meta["revffn"]``:
    split, adapter, coupling, merge); every other node runs as it is, so a branch
    computation that the rewrite dropped or changed shows as a difference.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.state: torch.Tensor | None = None

    def run_node(self, n: fx.Node) -> Any:
        tag = n.meta.get("revffn")
        if n.op == "call_module" and str(n.target).startswith("adapters."):
            return self.env[n.args[0]]  # type: ignore[index]
        if tag == "split" and n.target is not operator.getitem:
            self.state = self.env[n.args[0]]  # type: ignore[index]
            return (self.state, self.state)
        if tag == "coupling":
            stream, update = (self.env[a] if isinstance(a, fx.Node) else a for a in n.args[:2])
            del stream  # the original layer has one residual state
            self.state = self.state + update
            return self.state
        if tag == "merge":
            return self.state
        return super().run_node(n)


def recomposable(gm: fx.GraphModule) -> bool:
    """Whether a coupling graph's added nodes are all of the kinds :class:`_Recomposed`
    knows (couplings with other update rules, e.g. scaled streams, are not checked)."""
    if gm.meta.get("revffn", {}).get("split") not in ("halves", "copies"):
        return False
    if gm.meta.get("revffn", {}).get("parallel"):
        return False  # a parallel residual coupled in sequence computes another function
    tags = {n.meta.get("revffn") for n in gm.graph.nodes} - {None}
    return tags <= {"split", "adapter", "coupling", "merge", "cross_query", "cross_attention"}


def fidelity_error(original: fx.GraphModule, coupled: fx.GraphModule, hidden: torch.Tensor,
                   ctx: dict[str, Any]) -> float:
    """Relative error of the recomposed branches of ``coupled`` against ``original``
    (the layer's traced graph) on one input."""
    names = [n.name for n in original.graph.nodes if n.op == "placeholder"]
    args = [hidden, *(ctx.get(k) for k in names[1:])]
    want = original(*args)
    got = _Recomposed(coupled).run(*args)
    want = want[0] if isinstance(want, tuple) else want
    return _rel(got, want)


def round_trip(layer: Any, streams: list[torch.Tensor], ctx: dict[str, Any],
               iters: int, tol: float) -> float:
    """Run ``layer``'s updates on ``streams`` (keeping the bits exact streams drop), undo
    them last first with the runtime's own inverse (closed form or fixed point, as the
    backward does), and return the relative error of the round trip."""
    ys, lost, drawn = list(streams), [], []
    for u in layer.updates:
        if hasattr(u, "sampling"):  # bdia: check the training update (gamma drawn)
            u.sampling, u.first_in_stack = True, False
        drawn.append(u.prepare(ys))
        ys[u.target] = u.combine(ys, u.run(ys, ctx), lost)
    for u, d in zip(reversed(layer.updates), reversed(drawn)):
        u.restore(d)
        if u.closed_form:
            ys[u.target] = u.invert(ys[u.target], u.run(ys, ctx),
                                    lost.pop() if u.keeps_bits else None, ys)
        else:
            ys[u.target] = fixed_point(u, ys, ctx, iters, tol)[0]
    return _rel(torch.cat([y.flatten() for y in ys]), torch.cat([x.flatten() for x in streams]))


def reconstruction_errors(rev: RevModel, input_ids: torch.Tensor, kw: dict[str, Any],
                          seed: int = 0) -> list[tuple[LayerCheck, float]]:
    """Per reversible layer: ||inverse(layer(x)) - x|| / ||x|| through the runtime's own
    inverse, streams concatenated, with the run-time guard's tolerance for that layer."""
    specs = rev.specs()
    by_layer = {}
    graph = rev.graph(has_mask="attention_mask" in kw, has_labels="labels" in kw)
    for stack in (m for m in graph.modules() if isinstance(m, RevStack)):
        for layer in stack.layers:
            by_layer[layer.name] = layer
    names = {rev.traced.layers[i].qualname: i for i in specs}
    seen: dict[str, tuple[Any, Any]] = {}
    handles = []
    for name, layer in by_layer.items():
        def hook(_m: Any, args: Any, _out: Any, _n: str = name) -> None:
            streams, ctx = args
            seen[_n] = ([s.detach() for s in streams], ctx)
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            rev(input_ids, **kw)
    finally:
        for h in handles:
            h.remove()
    checks = []
    opts = rev.options
    with torch.no_grad():
        for name, (xs, ctx) in seen.items():
            i = names[name]
            spec, layer = specs[i], by_layer[name]
            trip = xs
            if opts.exact_streams:  # as training runs it: on the grid, with the stored bits
                grid = choose_grid(opts.stream_dtype,
                                   layer.updates[0].compute_dtype or xs[0].dtype)
                trip = round_to_grid([x.to(grid.carrier) for x in xs], grid)
                if grid.int_units:  # the generated backward's int32 units
                    trip = [to_units(x, grid.bits) for x in trip]
                for u in layer.updates:
                    u.grid, u.view_dtype = grid.bits, grid.view_dtype
            try:
                err = round_trip(layer, trip, ctx, opts.fixed_point_iters,
                                 opts.fixed_point_tol)
            finally:
                for u in layer.updates:
                    u.grid, u.view_dtype = None, None
            fp = any(not u.closed_form for u in layer.updates)
            compute = layer.updates[0].compute_dtype or xs[0].dtype
            rtol = guard.tolerance(xs[0].dtype, compute, opts.fixed_point_tol if fp else None)
            fid = None
            if recomposable(spec.forward):
                hidden = MERGES[spec.split](*(x.to(compute) for x in xs))
                fid = fidelity_error(rev.traced.layers[i].trace(False), spec.forward, hidden, ctx)
            checks.append((LayerCheck(i, name, err, fid), rtol))
    return sorted(checks, key=lambda c: c[0].index)


def _measure(rev: RevModel, input_ids: torch.Tensor, kw: dict[str, Any], seed: int,
             output_router_logits: bool, train: bool) -> tuple[Any, ...]:
    """One batch in ``train`` mode: the loss and the gradients of the generated backward,
    of plain autograd and of the float64 reference, the fixed-point statistics, then (in
    eval mode) each layer's reconstruction check; the model's mode and guard restored."""
    was = rev.training
    rev.train(train)
    guard_was = rev.options.guard
    dtype = next(rev.parameters()).dtype
    try:
        # the guard would raise inside the backward; verify reports what it measures instead
        rev.options.guard = "off"
        rev.options.fixed_point_stats.clear()
        loss, g_gen = _grads(rev, input_ids, kw, seed, output_router_logits)
        fixed = dict(rev.options.fixed_point_stats)
        with rev.plain_autograd():
            _, g_auto = _grads(rev, input_ids, kw, seed, output_router_logits)
        if dtype == torch.float64:  # the reference is plain autograd itself
            g_ref = g_auto
        else:
            ref = float64_copy(rev)
            ref.train(train)
            with ref.plain_autograd():
                _, g_ref = _grads(ref, input_ids, kw, seed, output_router_logits)
            del ref
        rev.eval()  # deterministic: no dropout, no sampled routing
        checked = reconstruction_errors(rev, input_ids, kw, seed)
    finally:
        rev.options.guard = guard_was
        rev.train(was)
    return loss, g_gen, g_auto, g_ref, fixed, checked


def verify(rev: RevModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, output_router_logits: bool = False,
           seed: int = 0, train: bool = True) -> VerifyReport:
    """Compare the generated backward with plain autograd on one batch.

    ``labels`` default to ``input_ids`` (the causal-LM loss). The model is put in train
    mode (``train=True``) so dropout and sampled routing are exercised and replayed, and
    restored to its previous mode afterwards.
    """
    kw: dict[str, Any] = {"labels": input_ids if labels is None else labels}
    if labels is None and rev.traced.convention.labels is None:
        kw = {}  # the model computes no loss: the check differentiates its logits
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    dtype = next(rev.parameters()).dtype
    loss, g_gen, g_auto, g_ref, fixed, checked = _measure(rev, input_ids, kw, seed,
                                                          output_router_logits, train)
    e_auto = relative_error(g_auto, g_ref)
    err = relative_error(g_gen, g_ref)
    worst = worst_parameter(g_gen, g_ref)
    gtol = tolerance(e_auto, dtype)
    if fixed:
        gtol = max(gtol, FIXED_POINT_GRAD_TOL)
    missing = set(g_gen) ^ set(g_auto)  # a gradient that vanished (or appeared)
    if missing:
        worst, err = sorted(missing)[0], float("inf")
    emb_err = relative_error({EMBEDDINGS: g_gen[EMBEDDINGS]}, {EMBEDDINGS: g_ref[EMBEDDINGS]}) \
        if EMBEDDINGS in g_gen and EMBEDDINGS in g_ref else 0.0
    emb_auto = relative_error({EMBEDDINGS: g_auto[EMBEDDINGS]}, {EMBEDDINGS: g_ref[EMBEDDINGS]}) \
        if EMBEDDINGS in g_auto and EMBEDDINGS in g_ref else 0.0
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        dtype = torch.bfloat16
    ftol = FIDELITY_TOLERANCES.get(dtype, 1e-2)
    layers = [c for c, _ in checked]
    rtol = max((t for _, t in checked), default=0.0)
    ok = (err <= gtol and emb_err <= max(gtol, tolerance(emb_auto, dtype))
          and len(layers) == len(rev.converted)
          and all(c.reconstruction_err <= t for c, t in checked)
          and all(c.fidelity_err is None or c.fidelity_err <= ftol for c in layers))
    return VerifyReport(ok, err, worst, emb_err, loss, layers, gtol, rtol,
                        str(dtype).replace("torch.", ""), fixed, ftol, e_auto)
