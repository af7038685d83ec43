"""``revffn plan``: will full fine-tuning fit? Peak memory by category, from a config alone.

For plain fine-tuning, gradient checkpointing, the reversible stack, and the reversible
stack with the lean loss head, each with an ordinary optimizer and with the optimizer fused
into the backward (:mod:`revffn_fx.training.fused`), the peak of one training step is

    parameters + gradients + optimizer states + activations + loss head

- with an ordinary optimizer the peak is at the end of the backward: every gradient exists,
  and the activations are those live then (:attr:`Estimate.peak_activation_bytes`);
- with the fused optimizer gradients never coexist (the largest single gradient is
  counted) and the peak moves to the start of the backward: everything saved for backward
  plus one layer's (or one branch's) recomputation.

Activations come from :mod:`revffn_fx.estimate`; parameters are counted on a meta-device
model built from the config (no weights are read). Optimizer states: AdamW keeps two
moments in the parameters' dtype, 8-bit AdamW two one-byte moments, SGD one momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .estimate import Estimate, _dtype_bytes, estimate
from .output import parse_bytes

__all__ = ["PlanRow", "activation_peak", "memory_plan", "parse_bytes"]

OPTIMIZERS = {"adamw": 2.0, "adamw8bit": 2.0, "sgd": 1.0}  # states per parameter
# (label, estimate method, loss head)
METHODS = (("plain fine-tuning", "none", "original"),
           ("gradient checkpointing", "checkpoint", "original"),
           ("reversible (revffn)", "revffn", "original"),
           ("reversible + lean loss head", "revffn", "chunked"))
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

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.loss_head)


def _param_stats(config: Any, method: str,
                 layers: Sequence[int] | None = None) -> tuple[int, int]:
    """(number of parameters, numel of the largest one) of the transformed model; tied
    embeddings count once (``parameters()`` yields a shared tensor once)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    sizes = [p.numel() for p in model.parameters()]
    n, biggest = sum(sizes), max(sizes)
    if method == "revffn":
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))
        converted = int(config.num_hidden_layers) if layers is None else len(set(layers))
        n += 2 * hidden * hidden * converted  # up + down adapters per converted layer
    return n, biggest


def _activations(est: Estimate, method: str, fused: bool) -> tuple[int, int]:
    """(activation bytes at the step's peak, loss-head bytes) for one method."""
    head_bytes = sum(est.parts.get(k, 0) for k in _HEAD_PARTS)
    saved_rest = est.saved_bytes - head_bytes
    if method == "none":  # peak before any gradient: everything saved, and logits
        act = est.peak_activation_bytes - head_bytes
    elif fused:  # start of backward: all saved, plus one recomputation
        act = saved_rest + (est.recompute_bytes or est.peak_activation_bytes)
    else:  # end of backward: the last recomputation
        act = est.peak_activation_bytes
    return max(act, 0), head_bytes


def activation_peak(config: Any, batch: int, seq: int, method: str = "revffn",
                    loss_head: str = "chunked", dtype: torch.dtype | str | None = None,
                    layers: Sequence[int] | None = None, fused: bool = False) -> int:
    """Activations + loss head at the step's peak: what ``revffn plan`` adds to the
    parameters, gradients and optimizer states for ``method`` (``none``, ``checkpoint``,
    ``revffn``, ``revnet``), with ``layers`` converted (None: all)."""
    est = estimate(config, batch, seq, method, dtype, loss_head, layers)
    act, head = _activations(est, method, fused)
    return act + head


def memory_plan(config: Any, batch: int, seq: int, optimizer: str = "adamw",
                dtype: torch.dtype | str | None = None,
                layers: Sequence[int] | None = None) -> list[PlanRow]:
    """Estimated peak memory of one training step for every method, ordinary and fused;
    ``layers``: the decoder layers the reversible methods convert (None: all)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    e = _dtype_bytes(config, dtype)
    state_bytes = 1 if optimizer == "adamw8bit" else e
    stats = {m: _param_stats(config, m, layers) for m in ("none", "revffn")}
    rows = []
    for label, method, head in METHODS:
        n, biggest = stats["revffn" if method == "revffn" else "none"]
        est = estimate(config, batch, seq, method, dtype, head,
                       layers if method == "revffn" else None)
        for fused in (False, True):
            act, head_bytes = _activations(est, method, fused)
            grads = biggest * e if fused else n * e
            rows.append(PlanRow(label, fused, n * e, grads,
                                int(OPTIMIZERS[optimizer] * n * state_bytes), act,
                                head_bytes))
    return rows
