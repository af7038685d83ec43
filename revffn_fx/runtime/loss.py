"""A memory-lean causal-LM head: linear + logit transform + cross-entropy, chunk by chunk.

The full ``tokens x vocab`` logits are never materialised: each chunk of tokens gets its
logits, its loss and its gradients (for the hidden states, the head weight and bias) in
forward, and only those gradients are kept for backward. The logit transform (scaling,
soft-capping, the fp32 upcast the original loss applies) is the model's own, extracted
from its graph, so dtype rules stay those of the original loss.

Chunks are sized by bytes, not tokens (the rule of Liger-Kernel's fused linear
cross-entropy): a chunk's logits and their gradient take about as many bytes as the hidden
states the head reads, so the head's working set stays about twice the hidden states (their
gradient plus one chunk) whatever the vocabulary. When the transform is only the fp32
upcast (most models), the softmax and its gradient are computed in place in one buffer per
chunk; any other transform runs through autograd on the chunk's logits. The weight
gradient is accumulated by ``addmm_`` into one buffer, never as a per-chunk copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LogitFn = Callable[[torch.Tensor], torch.Tensor]

#: Fewest tokens per chunk: below this the per-chunk passes over the head weight (logits,
#: hidden gradient, weight gradient) cost more time than the logits they save memory on.
MIN_CHUNK = 32


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


def bytes_per_logit(dtype: torch.dtype, upcast_only: bool) -> int:
    """Live bytes per logit element while a chunk is worked on.

    In-place path: the logits in the model's dtype and their fp32 copy (one buffer when the
    model is fp32), which becomes the softmax, then the gradient. Autograd path: the fp32
    logits, the saved log-softmax and the gradient, plus the model-dtype logits.
    """
    e = torch.finfo(dtype).bits // 8
    if upcast_only:
        return 4 if e == 4 else 4 + e
    return e + 12


def head_chunk_tokens(tokens: int, hidden: int, vocab: int, dtype: torch.dtype,
                      upcast_only: bool = True, min_chunk: int = MIN_CHUNK) -> int:
    """Tokens per chunk so one chunk's working set is about the hidden states' bytes.

    ``tokens * hidden * bytes(dtype) / (vocab * bytes_per_logit)``, rounded down to a power
    of two, at least ``min_chunk`` and at most ``tokens`` (at least 1). In fp32 this is
    Liger-Kernel's ``tokens * hidden / vocab``.
    """
    e = torch.finfo(dtype).bits // 8
    per_token = vocab * bytes_per_logit(dtype, upcast_only)
    n = max(1, tokens * hidden * e // per_token)
    n = 1 << (n.bit_length() - 1)  # power of two, not above the budget
    return max(1, min(tokens, max(n, min_chunk)))


def _ce_grad_inplace(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
                     upcast: bool, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of ``z`` (chunk, vocab) and d(loss)/dz, in one buffer.

    ``upcast``: the loss is computed in fp32 (the model's ``logits.float()``), the gradient
    returned in ``z``'s dtype. Ignored rows contribute neither loss nor gradient.
    """
    x = z.float() if upcast else z
    if x is not z:
        del z
    yt = torch.where(valid, y, 0)
    target = x.gather(1, yt[:, None]).squeeze(1)
    m = x.amax(1, keepdim=True)
    x.sub_(m).exp_()
    s = x.sum(1, keepdim=True)
    rows = s.log().squeeze(1) + m.squeeze(1) - target
    loss = torch.where(valid, rows, 0).sum()
    if not need_grad:
        return loss, None
    x.div_(s)  # softmax
    x[torch.arange(x.shape[0], device=x.device), yt] -= 1.0
    x.mul_(valid[:, None].to(x.dtype))
    return loss, x


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, logit_fn: LogitFn | None, chunk: int, ignore_index: int,
                upcast: bool) -> Any:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        need = need_h or need_w or need_b
        gh = torch.zeros_like(hidden) if need_h else None
        gw = torch.zeros_like(weight) if need_w else None
        gb = torch.zeros_like(bias) if need_b else None
        w = weight.detach()
        b = bias.detach() if bias is not None else None
        total: torch.Tensor | None = None
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            h = hidden[start:stop].detach()
            y = labels[start:stop]
            if logit_fn is None:
                with torch.no_grad():  # z is not kept here: the fp32 copy may replace it
                    loss, dz = _ce_grad_inplace(F.linear(h, w, b), y, y != ignore_index,
                                                upcast, need)
            else:
                with torch.no_grad():
                    z = F.linear(h, w, b)
                # the chunk's own graph lives only inside this loop: hide it from any
                # saved-tensor hooks (memory probes, offloading), it is never kept
                with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                    z.requires_grad_(need)
                    loss = F.cross_entropy(logit_fn(z), y, ignore_index=ignore_index,
                                           reduction="sum")
                    dz = torch.autograd.grad(loss, z)[0] if need else None
                del z
            total = loss.detach() if total is None else total + loss.detach()
            if dz is None:
                continue
            # the gradients in the weight's dtype, autocast off: under autocast z may be
            # in a lower precision than the weight and the buffers the gradients go to
            with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
                dz = dz.to(w.dtype)
                if gh is not None:
                    torch.mm(dz, w, out=gh[start:stop]) if gh.dtype == w.dtype \
                        else gh[start:stop].copy_(dz @ w)
                if gw is not None:
                    gw.addmm_(dz.t(), h.to(w.dtype))
                if gb is not None:
                    gb += dz.sum(0).to(gb.dtype)
            del dz
        if total is None:  # no tokens at all
            total = hidden.new_zeros(())
        ctx.save_for_backward(*(g for g in (gh, gw, gb) if g is not None))
        ctx.has = (gh is not None, gw is not None, gb is not None)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        saved = iter(ctx.saved_tensors)
        out = []
        # the usual case (loss.backward() on the head's own output, grad 1) hands the
        # buffers over as they are: scaling them would allocate a second copy of each
        one = grad.numel() == 1 and bool(grad == 1)
        for has in ctx.has:
            g = next(saved) if has else None
            out.append(g if g is None or one else g * grad.to(g.dtype))
        return (*out, None, None, None, None, None)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor,
                                 bias: torch.Tensor | None, labels: torch.Tensor,
                                 logit_fn: LogitFn | None = None, chunk: int | None = None,
                                 ignore_index: int = -100, upcast: bool = True,
                                 min_chunk: int = MIN_CHUNK) -> torch.Tensor:
    """Sum of cross-entropy over tokens of ``logit_fn(hidden @ weight.T + bias)``.

    ``hidden``: (tokens, d); ``labels``: (tokens,), ``ignore_index`` entries skipped.
    ``logit_fn=None``: the transform is only a cast, to fp32 when ``upcast`` (the in-place
    path). ``chunk``: tokens per chunk; None sizes chunks by bytes
    (:func:`head_chunk_tokens`).
    """
    if chunk is None:
        chunk = head_chunk_tokens(hidden.shape[0], hidden.shape[-1], weight.shape[0],
                                  hidden.dtype, logit_fn is None, min_chunk)
    return _ChunkedLinearCE.apply(hidden, weight, bias, labels, logit_fn, max(1, int(chunk)),
                                  ignore_index, upcast)


class ChunkedLossHead(nn.Module):
    """Replaces lm_head -> logit transform -> cross-entropy in a model graph.

    ``forward(hidden, labels)`` with ``hidden`` the lm_head input (..., d) and ``labels``
    the shifted, flattened labels the original loss used; returns the loss reduced like
    the original: mean over non-ignored tokens, or sum / ``options.num_items_in_batch``
    when the caller (e.g. the Trainer under gradient accumulation) gives one.
    ``cast``: None when ``logit_fn`` does more than cast the logits (it then runs through
    autograd), else whether that cast is to fp32 (the in-place path). ``chunk``: tokens per
    chunk, None (default) to size chunks by bytes (:func:`head_chunk_tokens`).
    """

    def __init__(self, lm_head: nn.Module, logit_fn: nn.Module, options: Any,
                 ignore_index: int = -100, chunk: int | None = None,
                 cast: bool | None = None, min_chunk: int = MIN_CHUNK) -> None:
        super().__init__()
        self.lm_head = lm_head
        self.logit_fn = logit_fn
        self.options = options
        self.ignore_index = ignore_index
        self.chunk = chunk
        self.cast = cast
        self.min_chunk = min_chunk

    def chunk_tokens(self, tokens: int, dtype: torch.dtype) -> int:
        """Tokens per chunk for a batch of ``tokens`` hidden states of ``dtype``."""
        if self.chunk is not None:
            return self.chunk
        w = self.lm_head.weight
        return head_chunk_tokens(tokens, w.shape[1], w.shape[0], dtype, self.cast is not None,
                                 self.min_chunk)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        labels = labels.reshape(-1).to(h.device)
        fn = self.logit_fn if self.cast is None else None
        total = chunked_linear_cross_entropy(
            h, self.lm_head.weight, getattr(self.lm_head, "bias", None), labels, fn,
            self.chunk_tokens(h.shape[0], h.dtype), self.ignore_index, bool(self.cast))
        n = getattr(self.options, "num_items_in_batch", None)
        if n is None:
            n = (labels != self.ignore_index).sum()
        if torch.is_tensor(n):
            n = n.to(total.device)
        return total / n
