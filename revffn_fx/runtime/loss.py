"""A memory-lean causal-LM head: linear + logit transform + cross-entropy, chunk by chunk.

The full ``tokens x vocab`` logits are never materialised: each chunk of tokens gets its
logits, its loss and its gradients (for the hidden states, the head weight and bias) in
forward, and only those gradients are kept for backward. The logit transform (scaling,
soft-capping, the fp32 upcast the original loss applies) is the model's own, extracted
from its graph, so dtype rules stay those of the original loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LogitFn = Callable[[torch.Tensor], torch.Tensor]


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, logit_fn: LogitFn, chunk: int, ignore_index: int) -> Any:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if (need_b and bias is not None) else None
        total: torch.Tensor | None = None
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            # the chunk's own autograd graph lives only inside this loop: hide it from any
            # saved-tensor hooks (memory probes, offloading), it is never kept for backward
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                h = hidden[start:stop].detach().requires_grad_(need_h)
                w = weight.detach().requires_grad_(need_w)
                b = bias.detach().requires_grad_(need_b) if bias is not None else None
                logits = logit_fn(F.linear(h, w, b))
                loss = F.cross_entropy(logits, labels[start:stop], ignore_index=ignore_index,
                                       reduction="sum")
                wrt = [t for t, need in ((h, need_h), (w, need_w), (b, need_b))
                       if need and t is not None]
                grads = list(torch.autograd.grad(loss, wrt)) if wrt else []
            if need_h:
                gh[start:stop] = grads.pop(0)
            if need_w:
                gw += grads.pop(0)
            if gb is not None:
                gb += grads.pop(0)
            total = loss.detach() if total is None else total + loss.detach()
        if total is None:  # no tokens at all
            total = hidden.new_zeros(())
        ctx.save_for_backward(*(g for g in (gh, gw, gb) if g is not None))
        ctx.has = (gh is not None, gw is not None, gb is not None)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        saved = iter(ctx.saved_tensors)
        out = []
        for has in ctx.has:
            g = next(saved) if has else None
            out.append(g * grad.to(g.dtype) if g is not None else None)
        return (*out, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, labels: torch.Tensor,
                                 logit_fn: LogitFn, chunk: int = 1024,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Sum of cross-entropy over tokens of ``logit_fn(hidden @ weight.T + bias)``.

    ``hidden``: (tokens, d); ``labels``: (tokens,), ``ignore_index`` entries skipped.
    """
    return _ChunkedLinearCE.apply(hidden, weight, bias, labels, logit_fn, chunk, ignore_index)


class ChunkedLossHead(nn.Module):
    """Replaces lm_head -> logit transform -> cross-entropy in a model graph.

    ``forward(hidden, labels)`` with ``hidden`` the lm_head input (..., d) and ``labels``
    the shifted, flattened labels the original loss used; returns the loss reduced like
    the original: mean over non-ignored tokens, or sum / ``options.num_items_in_batch``
    when the caller (e.g. the Trainer under gradient accumulation) gives one.
    """

    def __init__(self, lm_head: nn.Module, logit_fn: nn.Module, options: Any,
                 ignore_index: int = -100, chunk: int = 1024) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.logit_fn = logit_fn
        self.options = options
        self.ignore_index = ignore_index
        self.chunk = chunk

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1).to(h.device)
        total = chunked_linear_cross_entropy(
            h, self.lm_head.weight, getattr(self.lm_head, "bias", None), labels,
            self.logit_fn, self.chunk, self.ignore_index)
        n = getattr(self.options, "num_items_in_batch", None)
        if n is None:
            n = (labels != self.ignore_index).sum()
        if torch.is_tensor(n):
            n = n.to(total.device)
        return total / n
