"""How the model really calls its decoder layers, read off one small forward.

The untouched model runs once on a few token ids (eval mode, no gradients) with hooks on
every decoder layer: each layer's arguments (bound to its forward's parameter names), its
output, whether the next layer reads this one's hidden state, and whether layers hand
each other state (an extra output the next layer reads, an argument object they write
into). Layers can then be traced on their own, with these calls as examples, however the
model's own forward is written.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..errors import TraceError


def forward_params(layer: nn.Module) -> list[str]:
    """Names of the positional parameters of the layer's forward (without ``self``)."""
    params = inspect.signature(inspect.unwrap(type(layer).forward)).parameters.values()
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return names or ["hidden_states"]


def bind_call(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[str, Any, dict[str, Any]]:
    """A call of ``layer`` as (hidden-state parameter name, its value, the other arguments
    by parameter name)."""
    names = forward_params(layer)
    if len(args) > len(names):
        raise TraceError(f"{type(layer).__name__} is called with {len(args)} positional "
                         f"arguments but its forward names only {len(names)}")
    bound = dict(kwargs)
    bound.update(zip(names, args))
    hidden = names[0]
    return hidden, bound.pop(hidden, None), bound


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def held_tensors(value: Any) -> set[int]:
    """Ids of the tensors an argument object holds (two levels into its attributes)."""
    out: set[int] = set()
    todo, depth = [value], 0
    while todo and depth < 3:
        nxt = []
        for v in todo:
            if isinstance(v, torch.Tensor):
                out.add(id(v))
            elif isinstance(v, dict):
                nxt += list(v.values())
            elif isinstance(v, (list, tuple)):
                nxt += list(v)
            elif hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type)):
                nxt += list(vars(v).values())
        todo, depth = nxt, depth + 1
    return out


def _stateful(value: Any) -> bool:
    """An argument object that can carry state between layers (not a tensor, a number,
    a string, None, or a tuple of those)."""
    leaves = pytree.tree_leaves(value)
    return any(not isinstance(v, (torch.Tensor, int, float, bool, str, type(None), torch.dtype,
                                  torch.device)) for v in leaves)


class _MetaValues(TorchFunctionMode):
    """On the meta device, values read back into Python (``.item()``, ``bool(t)``, ``int(t)``,
    ``.tolist()``) are zeros and False: the plain path of a model's data-dependent checks
    (no padding, no cache), so a meta model runs its forward far enough to call its layers."""

    _READS = {"item": 0, "__bool__": False, "__int__": 0, "__index__": 0, "__float__": 0.0}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = getattr(func, "__name__", "")
        t = args[0] if args else None
        if isinstance(t, torch.Tensor) and t.is_meta:
            if name == "tolist":
                return torch.zeros(t.shape, dtype=t.dtype).tolist()
            if name in self._READS:
                return False if t.dtype == torch.bool else self._READS[name]
        return func(*args, **(kwargs or {}))


@dataclass
class LayerCapture:
    """One decoder layer's first call in the example forward."""

    hidden_name: str
    hidden: torch.Tensor | None
    kwargs: dict[str, Any]  # every other argument, by parameter name
    output: Any
    calls: int = 1
    handoff: str = ""  # why the layer hands state to the next one ("" when it does not)

    @property
    def returns_tuple(self) -> bool:
        return isinstance(self.output, (tuple, list))

    @property
    def hidden_out(self) -> Any:
        return self.output[0] if self.returns_tuple else self.output


@dataclass
class Capture:
    """The layer calls of one forward, per layer index, and the model's output."""

    layers: list[LayerCapture | None]
    output: Any
    # chained[i]: layer i + 1 reads layer i's hidden output, as it is
    chained: list[bool] = field(default_factory=list)
    ids: torch.Tensor | None = None


def example_ids(model: nn.Module, length: int = 8) -> torch.Tensor:
    """A few token ids inside the model's vocabulary, on its device."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb = emb or next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    vocab = int(getattr(emb, "num_embeddings", 0) or getattr(
        getattr(model, "config", None), "vocab_size", 0) or 4)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (2, length), generator=gen)
    return ids.to(device)


def capture(model: nn.Module, layers: Sequence[nn.Module],
            call: Callable[[torch.Tensor], Any], ids: torch.Tensor | None = None,
            stub: bool = False) -> Capture:
    """Run ``call(ids)`` (the model in its own convention) once, recording every layer's
    first call; layers called more than once are noted (a looped layer). A meta-device
    model runs too, its data-dependent reads taken as zeros (:class:`_MetaValues`); with
    ``stub`` the layers' bodies do not run (each returns its hidden state), for a meta model
    whose layers cannot run on the meta device: the calls are recorded, not the outputs
    (layers handing state on go unnoticed)."""
    ids = example_ids(model) if ids is None else ids
    records: list[LayerCapture | None] = [None] * len(layers)
    index = {id(m): i for i, m in enumerate(layers)}
    held: dict[int, tuple[str, set[int], Any]] = {}
    handles = []

    def pre(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        i = index[id(mod)]
        if records[i] is not None:
            records[i].calls += 1
            return
        name, hidden, bound = bind_call(mod, args, kwargs)
        records[i] = LayerCapture(name, hidden, bound, None)
        for k, v in bound.items():
            if _stateful(v):
                held[i] = (k, held_tensors(v), v)

    def post(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        i = index[id(mod)]
        rec = records[i]
        if rec is None or rec.output is not None:
            return
        rec.output = out
        if i in held:
            k, before, value = held[i]
            if held_tensors(value) != before:
                rec.handoff = (f"it writes into its {k!r} argument (a {type(value).__name__}), "
                               "which the model hands to the next layer: layers that hand "
                               "state to the next cannot be coupled")

    for m in layers:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
        if stub:
            m.__dict__["forward"] = lambda *a, _m=m, **k: bind_call(_m, a, k)[1]
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), (_MetaValues() if ids.is_meta else nullcontext()):
            out = call(ids)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
        if stub:
            for m in layers:
                m.__dict__.pop("forward", None)
    return finish(records, out, ids)


def finish(records: list[LayerCapture | None], out: Any, ids: torch.Tensor | None = None
           ) -> Capture:
    """A :class:`Capture` of ``records`` (one group of layers, in order): which layers
    chain, which hand state to the next."""
    chained = []
    # tensors some layer reads that an earlier layer returned besides its hidden state
    read = {id(t) for rec in records if rec is not None for t in _tensors(rec.kwargs)}
    hands = any(rec is not None and rec.returns_tuple
                and any(id(t) in read for t in _tensors(list(rec.output[1:])))
                for rec in records)
    for rec in records:
        if rec is None:
            continue
        if rec.returns_tuple:
            extra = _tensors(list(rec.output[1:]))
            passed = hands and bool(extra)
            if passed and not rec.handoff:
                rec.handoff = ("it returns a tensor besides the hidden state, which the model "
                               "hands to the next layer (e.g. top-k indices): layers that hand "
                               "state to the next cannot be coupled")
            elif extra and not rec.handoff:
                rec.handoff = (f"it returns {len(extra)} tensor(s) besides the hidden state, "
                               "which the model reads: only the hidden state leaves a coupling")
    for i in range(len(records) - 1):
        a, b = records[i], records[i + 1]
        chained.append(a is not None and b is not None and b.hidden is a.hidden_out)
    return Capture(records, out, chained, ids)


def residual_shaped(rec: LayerCapture | None) -> bool:
    """The layer takes and returns a tensor of one shape (the residual stream)."""
    if rec is None or not isinstance(rec.hidden, torch.Tensor):
        return False
    out = rec.hidden_out
    return isinstance(out, torch.Tensor) and out.shape == rec.hidden.shape


def same_context(a: LayerCapture, b: LayerCapture, names: Sequence[str]) -> bool:
    """Two layers receive the very same context values (mask, positions) for ``names``."""
    for k in names:
        ta, tb = pytree.tree_leaves(a.kwargs.get(k)), pytree.tree_leaves(b.kwargs.get(k))
        if len(ta) != len(tb) or any(
                x is not y and (isinstance(x, torch.Tensor) or x != y) for x, y in zip(ta, tb)):
            return False
    return True
