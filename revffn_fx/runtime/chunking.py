"""Token-chunked calls of token-wise branch modules (the MoE block, a dense MLP).

At long context the largest working set of the backward is not the stored boundaries but
one branch's recompute: an MoE block's dispatch holds about 44 hidden-state-sized tensors
per call (gathered tokens, expert activations, combine weights), measured in
``benchmarks/long_context.py --floor``. A module that maps each token on its own can run on
the tokens a chunk at a time: :class:`TokenChunked` does that, and while autograd records
(the generated backward's recompute) each chunk runs under activation checkpointing, so
the vector-Jacobian product rebuilds one chunk's working set at a time.

Whether a module is token-wise is decided twice: the compiler wraps only modules the
analysis classified as ``moe`` or ``mlp`` (``passes/chunk_tokens.py``), and the first call
long enough to chunk probes the module on a short prefix (whole against two halves, the RNG
left untouched). A module that fails the probe (capacity-limited routing, a tuple output,
noise drawn per call) is always called whole.

The forward and the recompute chunk identically (the same shapes, hence the same kernels),
so the reconstruction stays exact. Router logits recorded per chunk are concatenated back
into one tensor per call, in the unchunked order.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

#: tokens per half of the probe (2 x this many tokens are compared, whole against halves)
PROBE_TOKENS = 8
#: relative difference (norm of the difference over the norm of the whole call) below
#: which the halves are taken to equal the whole: kernels of other shapes round differently
PROBE_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
PROBE_TOL_16BIT = 3e-2


class TokenChunked(nn.Module):
    """``module(x)`` for ``x`` of shape ``(..., tokens, hidden)``, the tokens
    ``options.token_chunk`` at a time when there are more (0: never chunk)."""

    def __init__(self, module: nn.Module, options: Any) -> None:
        super().__init__()
        self.module = module
        # not a submodule attribute: the runtime options are shared, not owned
        object.__setattr__(self, "options", options)
        self.tokenwise: bool | None = None  # None: not probed yet
        self.why = ""  # why the probe refused chunking

    def forward(self, x: torch.Tensor) -> Any:
        chunk = int(getattr(self.options, "token_chunk", 0) or 0)
        flat = x.reshape(1, -1, x.shape[-1]) if x.dim() >= 2 else None
        if flat is None or chunk <= 0 or flat.shape[1] <= chunk or not self._probe(x):
            return self.module(x)
        tap = getattr(self.options, "router_tap", None)
        recording = tap is not None and tap.active
        pieces = flat.split(chunk, dim=1)
        # checkpoint each chunk while autograd records (the generated backward's recompute);
        # the reference path (plain autograd) keeps ordinary autograd over the same chunks
        ckpt = torch.is_grad_enabled() and not getattr(self.options, "plain_autograd", False)
        outs, records = [], []
        for piece in pieces:
            if recording:
                with tap.recording() as rec:
                    outs.append(self._call(piece, ckpt))
                records.append(rec)
            else:
                outs.append(self._call(piece, ckpt))
        if recording:
            tap.records.extend(_merge_records(records, x.shape[:-1]))
        return torch.cat(outs, dim=1).reshape(x.shape)

    def _call(self, piece: torch.Tensor, ckpt: bool) -> torch.Tensor:
        if ckpt:
            return checkpoint(self.module, piece, use_reentrant=False)
        return self.module(piece)

    def _probe(self, x: torch.Tensor) -> bool:
        """Whether the module maps each token on its own: on the first ``2 *
        PROBE_TOKENS`` tokens (flattened over the batch), the whole call against its two
        halves. Run once, under no_grad, with the RNG state put back afterwards."""
        if self.tokenwise is not None:
            return self.tokenwise
        n = PROBE_TOKENS
        flat = x.detach().reshape(1, -1, x.shape[-1])[:, :2 * n]
        devices = [flat.device.index or 0] if flat.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=True):
            tap = getattr(self.options, "router_tap", None)
            with tap.recording(on=False) if tap is not None else nullcontext():
                whole = self.module(flat)
                halves = [self.module(flat[:, :n]), self.module(flat[:, n:])]
        if not (isinstance(whole, torch.Tensor) and all(isinstance(h, torch.Tensor)
                                                         for h in halves)):
            self.tokenwise, self.why = False, "its output is not one tensor"
        elif whole.shape != flat.shape:
            self.tokenwise, self.why = False, "its output is not shaped like its input"
        else:
            diff = (torch.cat(halves, dim=1) - whole).float().norm()
            rel = float(diff / whole.float().norm().clamp_min(1e-30))
            tol = PROBE_TOL.get(whole.dtype, PROBE_TOL_16BIT)
            self.tokenwise = rel <= tol
            if not self.tokenwise:
                self.why = (f"its output on a token depends on the other tokens (halves "
                            f"differ from the whole call by {rel:.2g})")
        if not self.tokenwise:
            logger.info("%s is called whole, not in token chunks: %s",
                        type(self.module).__name__, self.why)
        return self.tokenwise


def _merge_records(records: list[list[torch.Tensor]], lead: torch.Size
                   ) -> list[torch.Tensor]:
    """One tensor per router call from the chunks' records: each chunk recorded the same
    number of tensors, each with the chunk's tokens first (``(tokens, experts)``) or after
    a batch of one (``(1, tokens, experts)``); concatenated in token order and shaped as the
    unchunked call would have (``(batch * seq, experts)`` or ``(batch, seq, experts)``)."""
    counts = {len(r) for r in records}
    if len(counts) != 1:
        raise RuntimeError("token chunks recorded different numbers of router logits")
    merged = []
    for k in range(counts.pop()):
        parts = [r[k] for r in records]
        if parts[0].dim() >= 3 and parts[0].shape[0] == 1:
            whole = torch.cat(parts, dim=1)
            merged.append(whole.reshape(*lead, *whole.shape[2:]))
        else:
            merged.append(torch.cat(parts, dim=0))
    return merged
