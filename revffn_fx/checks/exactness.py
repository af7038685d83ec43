"""The exactness criterion: the generated backward against float64 of the same function.

A generated backward is *exact enough* when its gradients are as close to the truth as
ordinary autograd of the same coupled function in the same dtype. The truth is that
function in float64 under ordinary autograd (a float64 copy of the RevModel). With
``e_gen`` and ``e_auto`` the relative errors (norm of the difference over the norm of the
reference, all gradients together) of the generated backward and of plain autograd in the
training dtype, the criterion is::

    e_gen <= max(1.5 * e_auto, e_auto + slack(dtype))

``slack`` is 0.02 for 16-bit training, 1e-4 in float32 and 1e-9 in float64 (where the
reference *is* plain autograd, so e_auto is 0). Judging relative to autograd means a check
never fails a backward for rounding that autograd itself makes, and never passes one that
is worse than autograd by more than the slack (docs/quality.md, "Exactness").
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..frontend.outputs import logits_and_loss

#: how much worse than autograd in the training dtype a backward may be, absolute
SLACK = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.02, torch.float16: 0.02}


def slack(dtype: torch.dtype) -> float:
    """The criterion's absolute slack for a training dtype (16-bit: 0.02)."""
    return SLACK.get(dtype, 0.02)


def tolerance(e_auto: float, dtype: torch.dtype) -> float:
    """The most gradient error the criterion accepts, given autograd's in that dtype."""
    return max(1.5 * e_auto, e_auto + slack(dtype))


@dataclass
class Exactness:
    """Gradient errors against float64 of the same function: the generated backward's
    (``gen``), plain autograd's in the training dtype (``auto``), the criterion's bound
    (``tol``), and the worst parameter of the generated backward."""

    gen: float
    auto: float
    tol: float
    dtype: str
    worst: str = ""

    @property
    def ok(self) -> bool:
        return self.gen <= self.tol  # NaN-safe: NaN fails

    def __str__(self) -> str:
        return (f"{'OK' if self.ok else 'FAILED'}: gradient error {self.gen:.2e} against "
                f"float64 of the same function (autograd in {self.dtype}: {self.auto:.2e}; "
                f"bound {self.tol:.2e}; worst {self.worst or '-'})")


def float64_copy(rev: Any) -> Any:
    """A float64 copy of a RevModel computing the same function (its compiled graphs
    rebuilt; experts on the eager implementation, which has float64 kernels)."""
    ref = copy.deepcopy(rev)
    ref.to(torch.float64)
    setter = getattr(ref.model, "set_experts_implementation", None)
    if callable(setter):
        try:
            setter("eager")
        except (ValueError, AttributeError, NotImplementedError):
            pass  # a model without switchable experts
    ref.compiled.clear()
    return ref


def flat_grads(model: nn.Module, run: Callable[[], Any], names: list[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], float]:
    """Run ``run()`` (returns the model output), differentiate its loss (or the mean square
    of its logits when it has none), and return every parameter gradient (float64) and the
    loss."""
    for p in model.parameters():
        p.grad = None
    out = run()
    logits, loss = logits_and_loss(out)
    loss = loss if loss is not None else logits.float().pow(2).mean()
    loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()
             if p.grad is not None and (names is None or n in names)}
    for p in model.parameters():
        p.grad = None
    return grads, float(loss.detach())


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Norm of the difference over the norm of the reference, all gradients together (a
    gradient missing on one side counts as zero: a parameter that stopped training
    shows as error)."""
    num = den = 0.0
    for name in set(ref) | set(got):
        r, g = ref.get(name), got.get(name)
        r = torch.zeros_like(g) if r is None else r
        g = torch.zeros_like(r) if g is None else g
        num += float((g - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def worst_parameter(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> str:
    best, name = -1.0, ""
    for n, r in ref.items():
        g = got.get(n)
        e = float("inf") if g is None else float((g - r).norm() / r.norm().clamp_min(1e-300))
        if e > best:
            best, name = e, n
    return name


def exactness(rev: Any, input_ids: torch.Tensor, call: Callable[[Any], Any] | None = None,
              seed: int = 0, reference: Any = None) -> Exactness:
    """The criterion on one batch: the generated backward and plain autograd of ``rev``
    (in its dtype) against plain autograd of its float64 copy, from the same RNG seed.

    ``call(model)`` runs a forward and returns its output (default: the causal-LM loss,
    ``model(input_ids, labels=input_ids)``). ``reference``: a float64 copy made earlier
    (:func:`float64_copy`), to check several batches against one copy.
    """
    if call is None:
        def call(m: Any) -> Any:
            return m(input_ids, labels=input_ids)
    was = rev.training
    dtype = next(rev.parameters()).dtype
    ref = float64_copy(rev) if reference is None else reference
    ref.train(was)

    def seeded(m: Any) -> Callable[[], Any]:
        def run() -> Any:
            torch.manual_seed(seed)
            return call(m)
        return run

    with ref.plain_autograd():
        g_ref, _ = flat_grads(ref, seeded(ref))
    with rev.plain_autograd():
        g_auto, _ = flat_grads(rev, seeded(rev))
    g_gen, _ = flat_grads(rev, seeded(rev))
    e_auto = relative_error(g_auto, g_ref)
    e_gen = relative_error(g_gen, g_ref)
    return Exactness(e_gen, e_auto, tolerance(e_auto, dtype), str(dtype).replace("torch.", ""),
                     worst_parameter(g_gen, g_ref))
