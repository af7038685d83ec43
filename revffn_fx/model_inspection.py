"""Looking into a RevModel: ``report()`` (what the transform did, layer by layer), its
one-line ``repr``, and ``probe_fixed_points`` (the cross-branch layers whose fixed-point
inverse does not converge on a sample batch fall back to the plain coupling).

:class:`InspectionMixin` is one of the classes :class:`revffn_fx.model.RevModel` is made of.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .model_setup import input_embeddings
from .runtime.fixed_point import fixed_point
from .runtime.stack import RevStack


class InspectionMixin:
    """Reports and the fixed-point probe of :class:`~revffn_fx.model.RevModel`."""

    def probe_fixed_points(self, input_ids: torch.Tensor | None = None) -> dict[int, str]:
        """Reconstruct every cross-branch layer's input from its output on a sample batch,
        as the backward would, and fall back to the plain coupling (closed-form inverse) in
        each layer whose fixed point does not converge to ``fixed_point_tol`` within half
        of ``fixed_point_iters`` (headroom for other batches). Returns (and adds to
        :attr:`cross_fallbacks`) the layers that fell back, with why. ``input_ids``: the
        batch (default: 2 x 16 seeded random ids)."""
        if self.attention != "cross":
            return {}
        if input_ids is None:
            vocab = int(getattr(self.config, "vocab_size", 0) or getattr(
                input_embeddings(self.model), "num_embeddings", 2))
            gen = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, vocab, (2, 16), generator=gen).to(
                next(self.model.parameters()).device)
        was = self.training
        self.eval()  # deterministic: no dropout, no sampled routing
        try:
            failed = self._probe(input_ids)
        finally:
            self.train(was)
        index = {self.traced.layers[i].qualname: i for i in self.converted}
        out = {}
        for name, (iters, res) in failed.items():
            i = index[name]
            out[i] = (f"the fixed point did not converge on a sample batch within half of "
                      f"fixed_point_iters={self.options.fixed_point_iters} (residual {res:.2g} "
                      f"after {iters} iterations, tolerance {self.options.fixed_point_tol:.0e})")
            self._cross[i] = out[i]
            self.cross_status[i] = f"closed form: {out[i]}"
            warnings.warn(f"layer {i} ({name}): cross-branch attention falls back to the plain "
                          f"coupling: {out[i]}", stacklevel=3)
        if out:  # recompile those layers with the plain coupling
            self.compiled.clear()
            self.cross_fallbacks.update(out)
        return out

    def _probe(self, input_ids: torch.Tensor) -> dict[str, tuple[int, float]]:
        seen: dict[str, tuple[Any, Any, Any]] = {}
        graph = self.graph(False, has_mask=False, has_labels=False)
        handles = []
        for stack in (m for m in graph.modules() if isinstance(m, RevStack)):
            for layer in stack.layers:
                if all(u.closed_form for u in layer.updates):
                    continue

                def hook(m: Any, args: Any, out: Any, _n: str = layer.name) -> None:
                    seen[_n] = (m, list(out), args[1])

                handles.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                graph(input_ids)
                failed = {}
                opts = self.options
                for name, (layer, y, ctx) in seen.items():
                    for u in reversed(layer.updates):
                        if u.closed_form:
                            y[u.target] = y[u.target] - u.run(y, ctx)
                            continue
                        # within half the budget: headroom for batches that converge slower
                        budget = max(1, opts.fixed_point_iters // 2)
                        x, iters, res = fixed_point(u, y, ctx, budget, opts.fixed_point_tol)
                        if not res <= opts.fixed_point_tol:
                            failed[name] = (iters, res)
                            break
                        y[u.target] = x
        finally:
            for h in handles:
                h.remove()
        return failed

    def extra_repr(self) -> str:
        return f"coupling={self.coupling!r}, converted={self.converted}"

    def report(self) -> str:
        """What the transform did, one line each: the layers converted or refused (why),
        how each layer's residual updates were paired across the two streams, and with
        cross-branch attention which layers use it or fell back to the plain coupling."""
        n = len(self.plan.layers)
        lines = [f"{type(self.model).__name__}: {len(self.converted)} of {n} decoder layers "
                 f"converted to {self.coupling} couplings"]
        for lp in self.plan.layers:
            if not lp.convertible:
                lines.append(f"  layer {lp.index} not converted: {lp.reason}")
            elif lp.index in self.converted:
                pairing = getattr(lp, "pairing", "")
                lines.append(f"  layer {lp.index}: {pairing or ', '.join(lp.kinds)}")
        if self.attention == "cross":
            self.specs()  # the status of every layer is known once compiled
            for i in self.converted:
                status = self.cross_status.get(i, "")
                if status == "cross":
                    lines.append(f"  layer {i}: cross-branch attention (fixed-point inverse)")
                else:
                    lines.append(f"  layer {i}: plain coupling, cross-branch attention off: "
                                 f"{status.removeprefix('closed form: ')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        """One line (``rev.model`` prints the module tree): the model type, the coupling,
        the converted layers, the parameter count (tied weights once) and the loss head."""
        kind = getattr(self.config, "model_type", None) or type(self.model).__name__
        n = sum(p.numel() for p in self.parameters())
        runs: list[list[int]] = []
        for i in sorted(self.converted):  # [0, 1, 2, 5] -> "0-2,5"
            if runs and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        span = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"
        return (f"RevModel({kind}, {self.coupling}: layers {span}"
                f" of {len(self.plan.layers)} reversible, {n:,} parameters, loss head "
                f"{self.loss_head})")
