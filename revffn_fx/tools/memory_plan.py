"""``revffn plan``: will full fine-tuning fit? Peak memory by category, from a config alone.

For plain fine-tuning, gradient checkpointing, the reversible stack, every coupling's
reversible stack with the lean loss head (:data:`~revffn_fx.tools.estimate_memory.STACKS`:
its streams and, with exact streams, its stored bits), the exact mode (checkpointing + lean
head) and the exact mode with its saved tensors offloaded to the host, each with an
ordinary optimizer and with the optimizer fused into the backward
(:mod:`revffn_fx.training.fused`), the peak of one whole training step is

    parameters + gradients + optimizer states + activations + loss head

at the larger of two moments (:func:`whole_step`, what ``revffn bench --step`` measures):

- the loss: no gradient exists yet; everything saved before the head, and the head's own
  peak (the original head holds three fp32 copies of the logits);
- with an ordinary optimizer, the end of the backward and the optimizer step: every
  gradient exists, with the last recomputation or the step's temporaries;
- with the fused optimizer gradients never coexist: one parameter's step (its gradient and
  the step's temporaries) or the start of the backward (everything saved for backward plus
  one layer's or branch's recomputation), whichever is larger.

Activations come from :mod:`revffn_fx.tools.estimate_memory`; parameters are counted on a
meta-device model built from the config (no weights are read). Optimizer states: AdamW keeps two
moments in the parameters' dtype, 8-bit AdamW two one-byte moments, SGD one momentum.

:func:`longest` answers the long-context question: for each method, the longest sequence at a
batch whose planned peak fits a budget (a binary search over the same estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..options import TransformOptions
from ..output import parse_bytes
from .estimate_memory import STACKS, Dims, dtype_bytes, estimate
from .step_methods import STEP_METHODS

__all__ = ["PlanRow", "activation_peak", "longest", "memory_plan", "parse_bytes",
           "plan_for_step_method"]

OPTIMIZERS = {"adamw": 2.0, "adamw8bit": 2.0, "sgd": 1.0}  # states per parameter
# (label, estimate method, loss head)
METHODS = (("plain fine-tuning", "none", "original"),
           ("gradient checkpointing", "checkpoint", "original"),
           ("reversible (revffn)", "revffn", "original"),
           ("reversible + lean loss head", "revffn", "chunked"),
           # every other coupling, full stack (a coupling added to STACKS is a row here)
           *((f"{c} + lean loss head", c, "chunked") for c in STACKS if c != "revffn"),
           ("exact mode", "checkpoint", "chunked"),
           ("exact mode + offload", "offload", "chunked"))
_HEAD_PARTS = ("head input + fp32 log-softmax", "labels", "head gradients (hidden, weight)")


@dataclass
class PlanRow:
    """One method's estimated peak, by category, in bytes."""

    method: str
    fused: bool
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    loss_head: int
    #: parts of ``activations``: a coupling's streams and stored bits (0 for the others)
    streams: int = 0
    stored_bits: int = 0
    #: ``exact mode + offload``: bytes kept in host memory instead (not in ``total``)
    host: int = 0

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.loss_head)


def _param_stats(config: Any, method: str,
                 layers: Sequence[int] | None = None) -> tuple[int, int]:
    """(number of parameters, numel of the largest one) of the transformed model; tied
    embeddings count once (``parameters()`` yields a shared tensor once)."""
    from ..frontend.loading import count_parameters

    n, biggest = count_parameters(config)  # one decoder layer per kind: O(kinds), not O(layers)
    if method in STACKS and STACKS[method].adapters:  # revffn: up + down per converted layer
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
        converted = int(config.num_hidden_layers) if layers is None else len(set(layers))
        n += STACKS[method].adapters * hidden * hidden * converted
    return n, biggest


def activation_peak(config: Any, batch: int, seq: int, method: str = "revffn",
                    loss_head: str = "chunked", dtype: torch.dtype | str | None = None,
                    layers: Sequence[int] | None = None, fused: bool = False) -> int:
    """Activations + loss head at the step's peak: what ``revffn plan`` adds to the
    parameters, gradients and optimizer states for ``method`` (``none``, ``checkpoint``,
    ``offload`` or a coupling), with ``layers`` converted (None: all)."""
    n, biggest = _param_stats(config, method, layers)
    row = whole_step(config, batch, seq, method, loss_head, fused, n, biggest, dtype=dtype,
                     layers=layers if method in STACKS else None)
    return row.activations + row.loss_head  # the same accounting as memory_plan's rows


def _head_transient(config: Any, batch: int, seq: int, e: int, head: str) -> int:
    """Bytes the loss head holds at its own peak, while the loss is computed.

    The original head: its input, the logits in the model's dtype (when not fp32), their
    fp32 copy and log-softmax, and in its backward the two fp32 gradients (3 fp32 copies of
    ``tokens x vocab`` at once, as measured). The lean head: its input, the gradients it
    computes in forward (hidden, weight) and one chunk (about the hidden states' bytes).
    """
    m = Dims.of(config)
    t = batch * seq
    td = t * m.hidden * e
    if head == "chunked":
        return 3 * td + m.vocab * m.hidden * e
    return td + t * m.vocab * (12 + (e if e != 4 else 0))


def whole_step(config: Any, batch: int, seq: int, method: str, head: str, fused: bool,
               n: int, biggest: int, optimizer: str = "adamw",
               dtype: torch.dtype | str | None = None,
               layers: Sequence[int] | None = None,
               stream_dtype: torch.dtype | str | None = None,
               exact_streams: bool | None = None, token_chunk: int | None = None) -> PlanRow:
    """The peak of a whole step (forward, loss, backward, optimizer step), as the larger of
    its two candidate moments (what ``revffn bench --step`` measures):

    - the loss: parameters, optimizer states, everything saved before the head and the
      head's own peak (:func:`_head_transient`); no gradient exists yet;
    - the end of the backward and the optimizer step (ordinary optimizer: every gradient,
      the last recomputation or the step's temporaries, two of the largest parameter), or
      with the fused optimizer the larger of one parameter's step (its gradient and the
      step's temporaries) and the start of the backward (everything saved, one
      recomputation, the lean head's gradients).
    """
    e = dtype_bytes(config, dtype)
    state_bytes = 1 if optimizer == "adamw8bit" else e
    params, states = n * e, int(OPTIMIZERS[optimizer] * n * state_bytes)
    est = estimate(config, batch, seq, method, dtype, head, layers, stream_dtype,
                   exact_streams, token_chunk)
    head_saved = sum(est.parts.get(k, 0) for k in _HEAD_PARTS)
    saved_rest = est.saved_bytes - head_saved
    loss = PlanRow("", fused, params, 0, states, max(saved_rest, 0),
                   _head_transient(config, batch, seq, e, head))
    step_temps = 2 * biggest * e
    recompute = est.recompute_bytes or est.peak_activation_bytes
    if fused:  # the larger of: one parameter stepped; the start of the backward
        start = max(saved_rest, 0) + (recompute if method != "none" else 0) + (
            head_saved if head == "chunked" else 0)
        end = (PlanRow("", True, params, biggest * e, states + step_temps, 0, 0)
               if biggest * e + step_temps >= start else
               PlanRow("", True, params, 0, states, start - (head_saved if head == "chunked"
                                                              else 0),
                       head_saved if head == "chunked" else 0))
    else:
        end = PlanRow("", False, params, n * e, states,
                      max(recompute if method != "none" else 0, step_temps), 0)
    row = max(loss, end, key=lambda r: r.total)
    if row.activations:  # the stacks' own part, when what is saved is held at the peak
        row.streams = est.parts.get("stack output", 0)
        row.stored_bits = est.parts.get("stored bits", 0)
    row.host = est.host_bytes
    return row


def memory_plan(config: Any, batch: int, seq: int, optimizer: str = "adamw",
                dtype: torch.dtype | str | None = None,
                layers: Sequence[int] | None = None) -> list[PlanRow]:
    """Estimated peak memory of one training step for every method, ordinary and fused;
    ``layers``: the decoder layers the reversible methods convert (None: all)."""
    _check_optimizer(optimizer)
    stats = _stats(config, layers)
    return [_plan_row(config, batch, seq, label, method, head, fused, stats[method],
                      optimizer, dtype, layers)
            for label, method, head in METHODS for fused in (False, True)]


def _plan_row(config: Any, batch: int, seq: int, label: str, method: str, head: str,
              fused: bool, stats: tuple[int, int], optimizer: str,
              dtype: torch.dtype | str | None, layers: Sequence[int] | None) -> PlanRow:
    """One row of :func:`memory_plan` (and what :func:`longest` searches): the method's
    whole step with its token chunks, labelled."""
    n, biggest = stats
    row = whole_step(config, batch, seq, method, head, fused, n, biggest, optimizer, dtype,
                     layers if method in STACKS else None,
                     token_chunk=_token_chunk(label, method))
    row.method = label
    return row


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")


def _token_chunk(label: str, method: str) -> int | None:
    """The rows RevModel runs (the couplings, the exact mode) chunk the feed-forward by
    tokens (the transform's default); transformers' own checkpointing does not."""
    return None if method in STACKS else (
        TransformOptions().token_chunk if label.startswith("exact mode") else 0)


def _stats(config: Any, layers: Sequence[int] | None) -> dict[str, tuple[int, int]]:
    """(parameters, largest parameter) per method: the meta model is built once, and once
    more for each coupling that adds parameters."""
    base = _param_stats(config, "none", layers)
    out = {m: base for _, m, _ in METHODS}
    for c, layout in STACKS.items():
        if layout.adapters:
            out[c] = _param_stats(config, c, layers)
    return out


@dataclass
class Longest:
    """The longest sequence of one method that fits (``seq`` 0: not even one token)."""

    method: str
    fused: bool
    seq: int
    row: PlanRow | None  # the planned peak at ``seq``


def longest(config: Any, batch: int, budget: int, optimizer: str = "adamw",
            dtype: torch.dtype | str | None = None, layers: Sequence[int] | None = None,
            max_seq: int = 2 ** 24) -> list[Longest]:
    """For every row of :func:`memory_plan`: the longest sequence at ``batch`` whose planned
    whole-step peak is within ``budget`` bytes (binary search; the peak grows with the
    sequence), up to ``max_seq``."""
    _check_optimizer(optimizer)
    stats = _stats(config, layers)
    out = []
    for label, method, head in METHODS:
        for fused in (False, True):
            def peak(seq: int, label: str = label, method: str = method, head: str = head,
                     fused: bool = fused) -> PlanRow:
                return _plan_row(config, batch, seq, label, method, head, fused,
                                 stats[method], optimizer, dtype, layers)

            lo, hi = 0, max_seq  # peak(lo) fits (or lo == 0), the answer is in [lo, hi]
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if peak(mid).total <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            out.append(Longest(label, fused, lo, peak(lo) if lo else None))
    return out


def plan_for_step_method(config: Any, batch: int, seq: int, step_method: str,
                         dtype: torch.dtype | str | None = None) -> PlanRow:
    """The planned peak of a ``revffn bench --step`` method (its coupling, head, fusion,
    offloading and stream options): what the measurement is compared with."""
    spec = STEP_METHODS[step_method]
    if spec.coupling is None:
        method = "checkpoint" if spec.checkpoint else "none"
    elif spec.coupling == "none":
        method = "offload" if spec.offload else "checkpoint"
    else:
        method = spec.coupling
    kw = dict(spec.transform)
    n, biggest = _param_stats(config, method)
    # RevModel (a coupling or the exact mode) chunks its feed-forward by tokens
    chunk = kw.get("token_chunk", TransformOptions().token_chunk) if spec.coupling else 0
    row = whole_step(config, batch, seq, method, spec.head, spec.fused, n, biggest,
                     dtype=dtype, stream_dtype=kw.get("stream_dtype"),
                     exact_streams=kw.get("exact_streams"), token_chunk=chunk)
    row.method = step_method
    return row
