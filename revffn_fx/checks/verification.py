"""verify: check a RevModel's generated backward against ordinary autograd.

Two checks on one batch:
- reconstruction: for every reversible layer, its generated inverse applied to its
  outputs gives back its inputs (relative error, per layer);
- gradients: the loss (plus the load-balancing loss when asked) differentiated through
  the generated backward and through plain autograd, from the same RNG seed, gives the
  same gradient for every parameter and for the input embeddings;
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

from ..frontend.ir import logits_and_loss
from ..model import RevModel, input_embeddings
from ..runtime.stack import RevStack
from ..runtime.streams import MERGES

# (gradient, reconstruction) tolerances by dtype, relative
TOLERANCES = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4),
              torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-2, 5e-2)}
# with fixed-point reconstructions (cross-branch attention) in fp64: the fixed point is only
# as exact as the branch itself, and HF RMSNorms compute in fp32 even for fp64 inputs
# (measured 4e-9 - 1e-8 on tiny mixtral; 1e-15 with fp64 norms)
FIXED_POINT_TOLERANCES = {torch.float64: (1e-7, 1e-7)}
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
        return (f"{'OK' if self.ok else 'FAILED'}: max gradient relative error "
                f"{self.max_grad_rel_err:.2e} (tol {self.grad_tol:.0e}, worst {self.worst_param}), "
                f"max reconstruction error {rec:.2e} (tol {self.recon_tol:.0e}){fid} over "
                f"{len(self.layers)} reversible layers, dtype {self.dtype}{fp}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def _grads(rev: RevModel, input_ids: torch.Tensor, kw: dict[str, Any], seed: int,
           router: bool) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    emb = input_embeddings(rev.model)
    box: list[torch.Tensor] = []

    def keep(_m: Any, _i: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        box.append(out)

    handle = emb.register_forward_hook(keep)
    try:
        rev.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = rev(input_ids, output_router_logits=router, **kw)
        logits, loss = logits_and_loss(out)  # hand-written models return their own structure
        loss = loss if loss is not None else logits.float().pow(2).mean()
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in rev.named_parameters() if p.grad is not None}
    rev.zero_grad(set_to_none=True)
    return float(loss.detach()), grads, box[0].grad.detach().clone()


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


def _grid_round_trip(layer: Any, streams: list[torch.Tensor], ctx: dict[str, Any]) -> float:
    """exact_streams: run ``layer``'s updates on ``streams`` keeping the bits each scaled
    update drops, undo them last first, and return the relative error of the round trip."""
    ys, lost = list(streams), []
    for u in layer.updates:
        ys[u.target] = u.combine(ys, u.run(ys, ctx), lost)
    for u in reversed(layer.updates):  # momentum/meft updates are closed form
        ys[u.target] = u.invert(ys[u.target], u.run(ys, ctx),
                                lost.pop() if u.keeps_bits else None)
    return _rel(torch.cat([y.flatten() for y in ys]), torch.cat([x.flatten() for x in streams]))


def reconstruction_errors(rev: RevModel, input_ids: torch.Tensor, kw: dict[str, Any],
                          seed: int = 0) -> list[LayerCheck]:
    """Per reversible layer: ||inverse(layer(x)) - x|| / ||x||, streams concatenated."""
    specs = rev.specs()
    by_layer = {}
    graph = rev.graph(has_mask="attention_mask" in kw, has_labels="labels" in kw)
    for stack in (m for m in graph.modules() if isinstance(m, RevStack)):
        for layer in stack.layers:
            by_layer[layer.name] = layer
    names = {rev.traced.layers[i].qualname: i for i in specs}
    seen: dict[str, tuple[Any, Any, Any]] = {}
    handles = []
    for name, layer in by_layer.items():
        def hook(_m: Any, args: Any, out: Any, _n: str = name) -> None:
            streams, ctx = args
            # with wide streams (stream_dtype) the emitted inverse graph is checked in the
            # dtype the branches compute in
            dt = _m.updates[0].compute_dtype if len(_m.updates) else None
            cast = (lambda t: t.detach().to(dt)) if dt is not None else (lambda t: t.detach())
            seen[_n] = ([cast(s) for s in streams], [cast(o) for o in out], ctx,
                        [s.detach() for s in streams])
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            torch.manual_seed(seed)
            rev(input_ids, **kw)
    finally:
        for h in handles:
            h.remove()
    checks = []
    with torch.no_grad():
        for name, (xs, ys, ctx, raw) in seen.items():
            i = names[name]
            spec = specs[i]
            if rev.options.exact_streams:
                # the emitted inverse graph does not know the bits exact_streams stores:
                # round-trip through the runtime's own update and inverse instead
                err = _grid_round_trip(by_layer[name], raw, ctx)
            else:
                inv = spec.inverse
                wanted = [n.name for n in inv.graph.nodes if n.op == "placeholder"][len(ys):]
                rec = inv(*ys, **{k: ctx[k] for k in wanted})
                err = _rel(torch.cat([r.flatten() for r in rec]),
                           torch.cat([x.flatten() for x in xs]))
            fid = None
            if recomposable(spec.forward):
                hidden = MERGES[spec.split](*xs)
                fid = fidelity_error(rev.traced.layers[i].trace(False), spec.forward, hidden, ctx)
            checks.append(LayerCheck(i, name, err, fid))
    return sorted(checks, key=lambda c: c.index)


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
    was = rev.training
    rev.train(train)
    try:
        rev.options.fixed_point_stats.clear()
        loss, g_rev, e_rev = _grads(rev, input_ids, kw, seed, output_router_logits)
        fixed = dict(rev.options.fixed_point_stats)
        with rev.plain_autograd():
            _, g_ref, e_ref = _grads(rev, input_ids, kw, seed, output_router_logits)
        rev.eval()  # the inverse graph replays no randomness: check it deterministically
        layers = reconstruction_errors(rev, input_ids, kw, seed)
    finally:
        rev.train(was)
    worst, err = "", 0.0
    for name, ref in g_ref.items():
        got = g_rev.get(name)
        e = _rel(got, ref) if got is not None else float("inf")
        if e > err or not worst:
            worst, err = name, e
    missing = set(g_rev) ^ set(g_ref)
    if missing:
        worst, err = sorted(missing)[0], float("inf")
    dtype = next(rev.parameters()).dtype
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        dtype = torch.bfloat16
    gtol, rtol = TOLERANCES.get(dtype, (1e-4, 1e-4))
    if fixed:
        gtol, rtol = FIXED_POINT_TOLERANCES.get(dtype, (gtol, rtol))
    ftol = FIDELITY_TOLERANCES.get(dtype, 1e-2)
    emb_err = _rel(e_rev, e_ref)
    ok = (err <= gtol and emb_err <= gtol and len(layers) == len(rev.converted)
          and all(c.reconstruction_err <= rtol for c in layers)
          and all(c.fidelity_err is None or c.fidelity_err <= ftol for c in layers))
    return VerifyReport(ok, err, worst, emb_err, loss, layers, gtol, rtol,
                        str(dtype).replace("torch.", ""), fixed, ftol)
