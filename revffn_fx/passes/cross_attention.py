"""The cross-branch attention module: ``cross(query, *args, **kwargs)`` is a pretrained
attention with its queries computed from ``query`` and its keys and values from the hidden
input (step 1 of :mod:`.cross_branch`: the trace).

``make_fx(pre_dispatch=True)`` over ``torch.func.functional_call`` records the module as
an aten graph whose inputs are the parameters, the hidden state and the other tensor
arguments (so parameters stay real inputs and get gradients). torch.fx's symbolic tracer
cannot run HF attention (``(*input_shape, -1, head_dim)`` unpacks a proxy); ``make_fx``
runs the code on (fake) tensors instead. Pre-dispatch keeps ``aten.linear`` /
``aten.scaled_dot_product_attention`` whole and sits above autograd and autocast, so one
graph serves with or without grad. Shapes and Python constants are specialised, hence one
graph per (shapes, dtypes, constant arguments, mode), cached. The graph is then split and
rebuilt by :mod:`.attention_split`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from .attention_split import CrossBranchError, build_cross_graph, split_roles

_CACHE_SIZE = 32


@dataclass
class _Compiled:
    graph: fx.GraphModule
    out_spec: Any
    cores: list[str]


class CrossAttention(nn.Module):
    """``(query, *args, **kwargs)``: ``attention(*args, **kwargs)`` with its queries
    computed from ``query`` and its keys/values from the hidden input (``args[hidden_at]``
    or ``kwargs[hidden_at]``). Holds the attention module, so its parameters are this
    module's and receive gradients."""

    def __init__(self, attention: nn.Module, hidden_at: int | str) -> None:
        super().__init__()
        self.attention = attention
        self.hidden_at = hidden_at
        self.__dict__["_cache"] = {}
        self.cores: list[str] = []

    def _named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.attention.named_parameters(), *self.attention.named_buffers()]

    def _without_hidden(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]:
        if isinstance(self.hidden_at, int):
            i = self.hidden_at
            return args[i], args[:i] + args[i + 1:], kwargs
        kw = dict(kwargs)
        return kw.pop(self.hidden_at), args, kw

    def _with_hidden(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if isinstance(self.hidden_at, int):
            i = self.hidden_at
            return args[:i] + (x,) + args[i:], kwargs
        return args, {**kwargs, self.hidden_at: x}

    def _compile(self, key: Any, example: torch.Tensor, leaves: list[Any], spec: Any,
                 tensors: list[torch.Tensor]) -> _Compiled:
        named = self._named_tensors()
        names = [n for n, _ in named]
        where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        box: dict[str, Any] = {}

        def original(*flat: torch.Tensor) -> list[torch.Tensor]:
            params = dict(zip(names, flat[:len(names)]))
            x = flat[len(names)]
            rest = list(leaves)
            for i, t in zip(where, flat[len(names) + 1:]):
                rest[i] = t
            args, kwargs = pytree.tree_unflatten(rest, spec)
            args, kwargs = self._with_hidden(x, args, kwargs)
            out = torch.func.functional_call(self.attention, params, args, kwargs)
            flat_out, box["spec"] = pytree.tree_flatten(out)
            return flat_out

        # fake tensors: nothing runs (no RNG use), and Python reading a tensor's values
        # either fails (data-dependent sizes) or shows as an op (item) that split_roles
        # refuses, instead of being baked in silently as in a real-tensor trace
        with torch.no_grad():
            traced = make_fx(original, pre_dispatch=True, tracing_mode="fake")(
                *(t for _, t in named), example, *tensors)
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        hidden = placeholders[len(names)]
        split = split_roles(traced.graph, hidden)
        graph = build_cross_graph(traced.graph, hidden, split)
        gm = fx.GraphModule(traced, graph, class_name="CrossAttentionGraph")
        compiled = _Compiled(gm, box["spec"], split.cores)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = compiled
        self.cores = split.cores
        return compiled

    def compiled(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> _Compiled:
        """The cross graph for this call's shapes and constants (traced on first use)."""
        return self._prepare(query, args, kwargs)[0]

    def _prepare(self, query: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[_Compiled, torch.Tensor, list[torch.Tensor]]:
        x, rest_args, rest_kwargs = self._without_hidden(args, kwargs)
        leaves, spec = pytree.tree_flatten((rest_args, rest_kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        consts = tuple(v if isinstance(v, (bool, int, float, str, type(None))) else
                       (type(v).__name__, id(v)) for v in leaves if not isinstance(v, torch.Tensor))
        p = next(iter(self.attention.parameters()), x)

        def meta(t: torch.Tensor) -> tuple[Any, ...]:
            return (tuple(t.shape), t.dtype, t.device)

        key = (meta(query), meta(x), tuple(meta(t) for t in tensors), consts, str(spec),
               self.attention.training, p.dtype, p.device,
               torch.is_autocast_enabled(x.device.type))
        if tuple(query.shape) != tuple(x.shape):
            raise ValueError(f"query {tuple(query.shape)} and hidden {tuple(x.shape)} differ "
                             "in shape")
        compiled = self._cache.get(key)
        if compiled is None:
            compiled = self._compile(key, x, leaves, spec, tensors)
        return compiled, x, tensors

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        compiled, x, tensors = self._prepare(query, args, kwargs)
        flat = compiled.graph(*(t for _, t in self._named_tensors()), query, x, *tensors)
        return pytree.tree_unflatten(list(flat), compiled.out_spec)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise :class:`CrossBranchError` unless the split works on this example call and
        ``cross(x, x)`` reproduces ``attention(x)``."""
        x = self._without_hidden(args, kwargs)[0]
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks for both
            ref = pytree.tree_leaves(self.attention(*args, **kwargs))
            torch.manual_seed(0)
            got = pytree.tree_leaves(self(x, *args, **kwargs))
        tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2
        def same(a: Any, b: Any) -> bool:
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
                return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)
            return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b

        if len(ref) != len(got) or not all(same(a, b) for a, b in zip(ref, got)):
            raise CrossBranchError("the rebuilt attention does not reproduce the original "
                                   "one on an example input")
