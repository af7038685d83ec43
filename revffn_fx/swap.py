"""Run the model's own forward with its converted layers swapped for reversible stacks.

Used when the model-level forward cannot be traced (data-dependent Python control flow, a
custom argument object) and for calls with keywords the model graph does not take
(``position_ids``, ``cache_position``, ...). Only the decoder layers are traced; the
model's forward runs as written, and for each run of consecutive converted layers the
first layer's call runs the whole :class:`~revffn_fx.runtime.stack.RevStack` and the
others hand its output on. Which layers chain is read off the example forward
(:mod:`revffn_fx.frontend.capture`) and checked again on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from .errors import RevFFNError
from .frontend.capture import bind_call, same_context
from .frontend.outputs import logits_and_loss, router_logits_off, template_of
from .runtime.chunking import restore_forwards
from .runtime.layers import RevLayer, RuntimeOptions
from .runtime.stack import RevStack


def find_runs(traced: Any, converted: Sequence[int]) -> list[list[int]]:
    """Runs of converted layer indices that one stack can span: each layer reads the
    previous one's hidden output as it is, with the very same context values."""
    cap = traced.capture
    runs: list[list[int]] = []
    for i in sorted(converted):
        if runs and runs[-1][-1] == i - 1 and cap is not None and cap.chained[i - 1]:
            a, b = cap.layers[i - 1], cap.layers[i]
            # a layer called more than once (tied, looped) runs its stack at every call
            if a.calls == b.calls == 1 and same_context(a, b, traced.layers[i].call.inputs):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


class SwapRunner(nn.Module):
    """``runner(input_ids, attention_mask=None, labels=None, **keywords) -> (logits, loss)``
    (with ``hidden_only``: ``(final hidden state, None)``), like a compiled model graph."""

    def __init__(self, traced: Any, layers: dict[int, RevLayer], split: str,
                 options: RuntimeOptions, checkpoint_rest: bool = False,
                 hidden_only: bool = False, head: nn.Module | None = None,
                 training: bool = True) -> None:
        super().__init__()
        self.__dict__["traced"] = traced  # not a submodule: it holds the model
        self.runs = find_runs(traced, layers)
        for k, run in enumerate(self.runs):
            self.add_module(f"revffn_stack_{k}", RevStack([layers[i] for i in run], split,
                                                          options))
        done = {i for run in self.runs for i in run}
        self.rest = ([i for i in range(len(traced.layers)) if i not in done]
                     if checkpoint_rest else [])
        self.hidden_only, self.training_key = hidden_only, training
        self.__dict__["head"] = head

    def stacks(self) -> list[RevStack]:
        return [getattr(self, f"revffn_stack_{k}") for k in range(len(self.runs))]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block, the converted layers' calls run the stacks."""
        traced = self.traced
        saved = [(lg.module, lg.module.__dict__.get("forward")) for lg in traced.layers]
        try:
            # set in __dict__ directly: nn.Module.__setattr__ would refuse or register a module
            for run, stack in zip(self.runs, self.stacks()):
                state: dict[str, Any] = {}
                for pos, i in enumerate(run):
                    lg = traced.layers[i]
                    lg.module.__dict__["forward"] = self._layer_forward(lg, stack, state,
                                                                        pos == 0, run[0])
            for i in self.rest:
                mod = traced.layers[i].module
                mod.__dict__["forward"] = functools.partial(_checkpointed, mod)
            yield
        finally:
            restore_forwards(saved)

    def _layer_forward(self, lg: Any, stack: RevStack, state: dict[str, Any], first: bool,
                       head: int) -> Any:
        names = lg.call.inputs
        rec = self.traced.capture.layers[lg.index] if self.traced.capture else None
        arity = len(rec.output) if rec is not None and rec.returns_tuple else 0

        def wrap(hidden: torch.Tensor) -> Any:
            return (hidden, *([None] * (arity - 1))) if arity else hidden

        def forward(*args: Any, **kwargs: Any) -> Any:
            _, hidden, bound = bind_call(lg.module, args, kwargs)
            ctx = {k: bound[k] for k in names if k in bound}
            if first:
                state["out"] = stack(hidden, **ctx)
                state["ctx"] = ctx
                return wrap(state["out"])
            if hidden is not state.get("out"):
                raise RevFFNError(
                    f"{lg.qualname} does not read the hidden state layer {head} 's stack "
                    "returned: the model changes it between layers, so they cannot share one "
                    "reversible stack")
            same = all(_same(ctx.get(k), state["ctx"].get(k)) for k in names)
            if not same:
                raise RevFFNError(f"{lg.qualname} is called with other context values than "
                                  f"layer {head}, whose stack computed it")
            return wrap(hidden)

        return forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **keywords: Any) -> tuple[Any, Any]:
        traced = self.traced
        conv = traced.convention
        conv.check_keywords(keywords)
        box: list[torch.Tensor] = []
        handle = None
        if self.hidden_only:
            if self.head is None:
                raise RevFFNError("no output embeddings found: cannot return the final "
                                  "hidden states")
            handle = self.head.register_forward_pre_hook(lambda m, a: box.append(a[0]))
        try:
            with self.swapped(), router_logits_off(traced.model):
                out = conv.call(traced.model, input_ids, attention_mask,
                                None if self.hidden_only else labels, **keywords)
        finally:
            if handle is not None:
                handle.remove()
        key = (self.training_key, attention_mask is not None and conv.mask is not None,
               labels is not None and conv.labels is not None and not self.hidden_only)
        conv.templates[key] = template_of(out)
        if self.hidden_only:
            return box[-1], None
        return logits_and_loss(out)


def _checkpointed(layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A layer left out of the stacks, its own forward run under activation checkpointing
    (``checkpoint_rest``)."""
    forward = functools.partial(type(layer).forward, layer)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _same(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(la, lb))
