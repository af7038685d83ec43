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

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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

    def __init__(self, module: nn.Module, options: Any, call: Any = None) -> None:
        super().__init__()
        self.module = module
        # not a submodule attribute: the runtime options are shared, not owned
        object.__setattr__(self, "options", options)
        # what one chunk runs: the module (its hooks included), or its own forward when
        # this wrapper stands in for that forward (chunked_forwards)
        object.__setattr__(self, "call", call if call is not None else module)
        self.tokenwise: bool | None = None  # None: not probed yet
        self.why = ""  # why the probe refused chunking

    def forward(self, x: torch.Tensor) -> Any:
        chunk = int(getattr(self.options, "token_chunk", 0) or 0)
        # at least the probe's halves: a first chunk of one token would read as a batch of one
        chunk = max(chunk, PROBE_TOKENS) if chunk > 0 else 0
        if x.dim() < 2 or chunk <= 0 or x.shape[:-1].numel() <= chunk or not self._probe(x):
            return self.call(x)
        flat = x.reshape(1, -1, x.shape[-1])
        tap = getattr(self.options, "router_tap", None)
        recording = tap is not None and tap.active
        # checkpoint each chunk while autograd records (the generated backward's recompute);
        # the reference path (plain autograd) keeps ordinary autograd over the same chunks
        ckpt = torch.is_grad_enabled() and not getattr(self.options, "plain_autograd", False)
        outs, records = [], []
        for piece in flat.split(chunk, dim=1):
            if recording:
                with tap.recording() as rec:
                    outs.append(self._call(piece, ckpt))
                records.append(rec)
            else:
                outs.append(self._call(piece, ckpt))
        if recording:
            tap.records.extend(_join(records, x.shape))
        return _join(outs, x.shape)

    def _call(self, piece: torch.Tensor, ckpt: bool) -> Any:
        if ckpt:
            return checkpoint(self.call, piece, use_reentrant=False)
        return self.call(piece)

    def _probe(self, x: torch.Tensor) -> bool:
        """Whether the module maps each token on its own: on the first ``2 *
        PROBE_TOKENS`` tokens (flattened over the batch), the whole call against its two
        halves joined. Run once, under no_grad, with the RNG state put back afterwards."""
        if self.tokenwise is not None:
            return self.tokenwise
        n = PROBE_TOKENS
        flat = x.detach().reshape(1, -1, x.shape[-1])[:, :2 * n]
        devices = [flat.device.index or 0] if flat.device.type == "cuda" else []
        tap = getattr(self.options, "router_tap", None)
        with torch.no_grad(), torch.random.fork_rng(devices=devices), \
                tap.recording(on=False) if tap is not None else nullcontext():
            whole = self.call(flat)
            halves = [self.call(flat[:, :n]), self.call(flat[:, n:])]
        try:
            rel = _difference(whole, _join(halves, flat.shape))
        except (TypeError, RuntimeError, ValueError) as e:  # structure or shapes differ
            self.tokenwise, self.why = False, f"its output cannot be joined by tokens ({e})"
        else:
            tol = PROBE_TOL.get(_dtype(whole), PROBE_TOL_16BIT)
            self.tokenwise = rel <= tol
            if not self.tokenwise:
                self.why = (f"its output on a token depends on the other tokens (halves "
                            f"differ from the whole call by {rel:.2g})")
        if not self.tokenwise:
            logger.info("%s is called whole, not in token chunks: %s",
                        type(self.module).__name__, self.why)
        return self.tokenwise


def _leaves(out: Any) -> list[Any]:
    return [out] if not isinstance(out, (tuple, list)) else [v for o in out for v in _leaves(o)]


def _dtype(out: Any) -> torch.dtype:
    return next(t.dtype for t in _leaves(out) if isinstance(t, torch.Tensor))


def _difference(whole: Any, joined: Any) -> float:
    """The largest relative difference (norm) over the tensors of two outputs of the same
    structure; a TypeError or ValueError when the structures differ."""
    a, b = _leaves(whole), _leaves(joined)
    if len(a) != len(b) or not any(isinstance(t, torch.Tensor) for t in a):
        raise ValueError("not the same tensors")
    worst = 0.0
    for s, t in zip(a, b):
        if not isinstance(s, torch.Tensor):
            if s is not t and s != t:
                raise ValueError("a non-tensor output differs")
            continue
        if s.shape != t.shape:
            raise ValueError(f"shape {tuple(t.shape)} against {tuple(s.shape)}")
        diff = (t.float() - s.float()).norm() / s.float().norm().clamp_min(1e-30)
        worst = max(worst, float(diff))
    return worst


def _join(parts: list[Any], shape: torch.Size) -> Any:
    """The chunks' outputs (or recorded router logits) joined in token order and shaped as
    the unchunked call's, for an input of ``shape`` ``(..., tokens, hidden)`` whose tokens
    were flattened to ``(1, N, hidden)`` and split: a tensor with the chunk's tokens after
    a batch of one (``(1, n, ...)``: the hidden state, or logits kept 3-d) goes back to
    ``(..., tokens, ...)``; one with the tokens first (``(n, experts)``) to ``(N, experts)``.
    Tuples and lists (an MoE block returning its router logits too) are joined elementwise.
    """
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and first.shape[0] == 1:
            whole = torch.cat(parts, dim=1)
            return whole.reshape(*shape[:-1], *whole.shape[2:])
        return torch.cat(parts, dim=0)
    if isinstance(first, (tuple, list)):
        if len({len(p) for p in parts}) != 1:
            raise ValueError("chunks returned different numbers of outputs")
        return type(first)(_join([p[k] for p in parts], shape) for k in range(len(first)))
    if all(p is first or p == first for p in parts):
        return first  # None, or a constant every chunk returns
    raise TypeError(f"cannot join outputs of type {type(first).__name__}")


class ChunkedForwards:
    """The token-wise submodules of a layer that runs whole (the exact mode's checkpointed
    layers), chunked by standing in for their ``forward`` while the layer runs: the layer's
    own code calls them as before, and their parameters keep their names."""

    def __init__(self, modules: list[nn.Module], options: Any) -> None:
        self.modules, self.options = list(modules), options
        self.wrappers: dict[int, TokenChunked] = {}

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the body each module's forward runs through its TokenChunked wrapper."""
        before = []
        try:
            for m in self.modules:
                own = m.__dict__.get("forward")  # an instance forward someone else installed
                before.append((m, own))
                w = self.wrappers.get(id(m))
                if w is None:
                    call = own if own is not None else functools.partial(type(m).forward, m)
                    w = self.wrappers[id(m)] = TokenChunked(m, self.options, call)
                m.__dict__["forward"] = w.forward  # not w(): no module hooks of its own
            yield
        finally:
            restore_forwards(before)


def restore_forwards(saved: list[tuple[nn.Module, Any]]) -> None:
    """Put back the instance ``forward`` each module had (None: none, the class's runs)
    after a stand-in forward was installed in its ``__dict__``."""
    for m, own in saved:
        if own is None:
            m.__dict__.pop("forward", None)
        else:
            m.__dict__["forward"] = own
