"""Generation from a RevModel through Hugging Face's ``GenerationMixin``, with a KV cache.

``rev.generate(...)`` runs the wrapped transformers model's own ``generate`` (so attention
masks, sampling, beams, ``min_new_tokens``/``max_new_tokens``, stopping criteria and the
cache classes are transformers' own) on the RevModel's weights, with each reversible run
of decoder layers computing the coupling's inference function:

- ``coupling="none"`` (the exact mode) is the original function: the original layers run
  as they are, cached path included, so greedy tokens equal the original model's.
- the other couplings: for the duration of the call, the first decoder layer of each
  reversible run computes the whole run (the runtime's own stack, in eval mode: split,
  couplings, merge) and the others in the run pass the hidden state through. The HF model
  still builds the mask, the positions and the cache; the attention modules the couplings
  call get that cache (a forward pre-hook passes it where the compiled branch passes
  ``None``), so each coupled layer attends over the cached keys and values of earlier
  tokens. Only attention carries state across positions (norms, adapters and the MoE are
  per token), so this is the coupled function on the whole sequence; ``tests/
  test_generation.py`` checks each step's logits against the uncached forward.
- cross-branch attention (``attention="cross"``) and layers whose attention the cache
  cannot reach fall back to ``use_cache=False`` (every step reruns the whole sequence).

A hand-written model (no ``generate`` of its own) keeps the greedy loop without a cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import RevFFNError

#: keyword names under which transformers versions pass the KV cache to attention modules
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
#: couplings whose inference function is the original model's (exact mode; BDIA evaluates
#: with gamma = 0, the original layer): they generate through the original layers
ORIGINAL_AT_EVAL = frozenset({"none", "bdia"})


def generate(rev: Any, *args: Any, **kwargs: Any) -> Any:
    """``rev.generate``: see the module docstring."""
    model = rev.model
    if not callable(getattr(model, "generate", None)):
        return greedy(rev, *args, **kwargs)
    was = rev.training
    rev.eval()
    try:
        if rev.coupling in ORIGINAL_AT_EVAL:
            return model.generate(*args, **kwargs)  # the original function, as it is
        reason = uncached_reason(rev)
        if reason is not None:
            kwargs["use_cache"] = False
        with coupled_layers(rev):
            return model.generate(*args, **kwargs)
    finally:
        rev.train(was)


def uncached_reason(rev: Any) -> str | None:
    """Why cached generation is not available for ``rev`` (None when it is)."""
    if rev.attention == "cross":
        return "cross-branch attention splits the attention module"
    for stack in rev.stacks(False):
        for layer in stack.layers:
            if not _cache_modules(layer):
                return f"{layer.name}: no module of its couplings takes the KV cache"
    return None


def _cache_modules(layer: nn.Module) -> list[nn.Module]:
    """The modules a coupled layer's branches call with a cache keyword (attention)."""
    out: dict[int, nn.Module] = {}
    for u in layer.updates:
        for node in u.branch.graph.nodes:
            if node.op == "call_module" and any(k in node.kwargs for k in CACHE_KWARGS):
                mod = u.branch.get_submodule(node.target)
                out[id(mod)] = mod
    return list(out.values())


class _Current:
    cache: Any = None


@contextmanager
def coupled_layers(rev: Any) -> Iterator[None]:
    """While inside, the wrapped model's decoder layers compute the coupled function: the
    first layer of each reversible run runs the run's stack, the others pass through, and
    attention modules the couplings call receive the model's KV cache."""
    current = _Current()
    by_name = {lg.qualname: lg.module for lg in rev.traced.layers}
    patched: list[nn.Module] = []
    handles = []

    def inject(mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        if current.cache is None:
            return None
        for k in CACHE_KWARGS:
            if k in kwargs and kwargs[k] is None:
                kwargs[k] = current.cache
        return args, kwargs

    try:
        for stack in rev.stacks(False):
            names = [layer.name for layer in stack.layers]
            first = by_name[names[0]]
            ctx_names = sorted({k for layer in stack.layers for u in layer.updates
                                for k in u.ctx_names})
            first.forward = _run_stack(stack, inspect.signature(first.forward), ctx_names,
                                       current)
            patched.append(first)
            for name in names[1:]:
                by_name[name].forward = _pass_through
                patched.append(by_name[name])
            for layer in stack.layers:
                for mod in _cache_modules(layer):
                    handles.append(mod.register_forward_pre_hook(inject, with_kwargs=True))
        yield
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
        for h in handles:
            h.remove()


def _pass_through(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _run_stack(stack: nn.Module, signature: inspect.Signature, ctx_names: list[str],
               current: _Current) -> Any:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        bound = signature.bind(*args, **kwargs)
        values = dict(bound.arguments)
        hidden = next(iter(values.values()))
        for name, param in signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                values.update(values.pop(name, {}) or {})
        missing = [k for k in ctx_names if k not in values]
        if missing:
            raise RevFFNError(f"generation: the decoder layer was called without {missing}, "
                              "which its couplings read")
        current.cache = next((values[k] for k in CACHE_KWARGS if values.get(k) is not None),
                             None)
        try:
            return stack(hidden, **{k: values[k] for k in ctx_names})
        finally:
            current.cache = None

    return forward


_GREEDY_KWARGS = {"max_new_tokens", "eos_token_id"}


@torch.no_grad()
def greedy(rev: Any, input_ids: torch.Tensor, max_new_tokens: int = 20,
           eos_token_id: int | None = None, **kwargs: Any) -> torch.Tensor:
    """Greedy decoding without a cache, for a hand-written model (no ``generate`` of its
    own): every step reruns the whole sequence. Rows that produced ``eos_token_id`` are
    padded with it. Returns ``input_ids`` with the new tokens appended."""
    from .frontend.outputs import logits_and_loss

    if kwargs:
        raise RevFFNError(f"{type(rev.model).__name__} has no generate() of its own: the "
                          f"RevModel decodes it greedily and takes only {sorted(_GREEDY_KWARGS)}"
                          f", not {sorted(kwargs)}")
    was = rev.training
    rev.eval()
    try:
        ids = input_ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            nxt = logits_and_loss(rev(ids))[0][:, -1].argmax(-1)  # any output structure
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
        return ids
    finally:
        rev.train(was)
