"""How a model is called, and how it calls its decoder layers.

:class:`Convention`: the model's forward read off its signature (which parameter takes the
token ids, the mask, the labels; keywords always passed). :class:`CausalLMEntry`: the
module the model-level trace starts from, calling the model in that convention.
:class:`LayerCall`: how the model calls one decoder layer (which arguments are graph
values, which are constants).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import RevFFNError, TraceError
from .capture import forward_params
from .outputs import split_output

# the names a forward may give its labels, in the order they are looked for
LABEL_NAMES = ("labels", "targets", "target", "label")
MASK_NAMES = ("attention_mask",)


@dataclass
class Convention:
    """How a model is called and what it returns, read off its forward's signature.

    ``ids``/``mask``/``labels``: the forward's parameter names for token ids, attention
    mask and labels (None when it takes none); ``consts``: keywords always passed
    (``use_cache=False``); ``template``: per traced graph key, the output structure with
    :data:`LOGITS`/:data:`LOSS` markers where the graph's (logits, loss) go back in.
    """

    model_name: str
    ids: str
    ids_positional: bool
    mask: str | None
    labels: str | None
    consts: dict[str, Any] = field(default_factory=dict)
    params: list[str] = field(default_factory=list)
    templates: dict[Any, Any] = field(default_factory=dict)
    # every parameter name the forward takes, and whether it takes **kwargs too
    accepted: list[str] = field(default_factory=list)
    var_kw: bool = False

    def accepts(self, name: str) -> bool:
        """The forward takes a keyword ``name`` (by name, or through ``**kwargs``)."""
        return self.var_kw or name in self.accepted

    def check_keywords(self, kwargs: dict[str, Any]) -> None:
        """Refuse keywords the model's forward does not take, naming them."""
        bad = sorted(k for k in kwargs if not self.accepts(k))
        if bad:
            raise RevFFNError(f"unsupported argument(s) {bad}: {self.model_name}.forward "
                              f"takes {', '.join(self.accepted)}")

    def call(self, model: nn.Module, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
             **extra: Any) -> Any:
        """Call ``model`` in this convention; ``extra`` keywords are passed as they are."""
        kw = dict(self.consts)
        if self.mask is not None and attention_mask is not None:
            kw[self.mask] = attention_mask
        if self.labels is not None and labels is not None:
            kw[self.labels] = labels
        kw.update(extra)
        if self.ids_positional:
            return model(input_ids, **kw)
        return model(**{self.ids: input_ids}, **kw)

    def describe(self, has_mask: bool = True, has_labels: bool = True) -> str:
        """The call tried, e.g. ``GPT.forward(input_ids, labels=...)``."""
        args = [self.ids if self.ids_positional else f"{self.ids}=..."]
        if self.mask and has_mask:
            args.append(f"{self.mask}=...")
        if self.labels and has_labels:
            args.append(f"{self.labels}=...")
        args += [f"{k}={v!r}" for k, v in self.consts.items()]
        return f"{self.model_name}.forward({', '.join(args)})"

    def canonical(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                  hf_order: Sequence[str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Arguments given in the model's own convention (its names, its positional order)
        as ``(input_ids,), {attention_mask, labels, <other keywords>}``.

        ``hf_order``: the positional order of the wrapper's own forward, used as is when
        the model's positional parameters follow it (transformers models)."""
        names = [self.ids, *(p for p in self.params if p != self.ids)]
        out = dict(kwargs)
        renames = {self.ids: "input_ids", self.mask: "attention_mask",
                   self.labels: "labels"}
        for own, canon in renames.items():
            if own and own != canon and own in out:
                if canon in out:
                    raise RevFFNError(f"{own} and {canon} both given")
                out[canon] = out.pop(own)
        pos = names if names[:2] != list(hf_order[:2]) else list(hf_order)
        if len(args) > len(pos):
            raise RevFFNError(f"{len(args)} positional arguments; {self.model_name}.forward "
                              f"takes at most {len(pos)}")
        for name, value in zip(pos, args):
            canon = renames.get(name, name)
            if canon in out:
                raise RevFFNError(f"got multiple values for argument {name!r}")
            out[canon] = value
        if out.get("attention_mask") is not None and self.mask is None:
            raise RevFFNError(f"{self.model_name}.forward takes no attention mask")
        if out.get("labels") is not None and self.labels is None:
            raise RevFFNError(f"{self.model_name}.forward takes no labels (it computes no "
                              "loss); compute the loss from the returned logits")
        ids = out.pop("input_ids", None)
        if ids is None:
            raise RevFFNError(f"no token ids given ({self.ids})")
        return (ids,), out


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def convention_of(model: nn.Module) -> Convention:
    """Read the model's calling convention off its forward's signature.

    The first positional parameter takes the token ids; ``attention_mask`` and a labels
    parameter (:data:`LABEL_NAMES`) are used when the forward has them (or takes
    ``**kwargs`` and is a transformers model). Any other parameter without a default
    cannot be supplied: that is a :class:`TraceError` saying so.
    """
    name = type(model).__name__
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"cannot read the signature of {name}.forward ({exc})") from None
    params = list(sig.parameters.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    hf = _is_hf(model)
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    positional = [p for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise TraceError(
            f"cannot trace {name}.forward{sig}: revffn-fx calls a model's forward with the "
            "token ids as its first positional argument, and this forward has none")
    ids = positional[0]
    names = {p.name for p in named}

    def pick(options: Sequence[str]) -> str | None:
        found = next((o for o in options if o in names), None)
        if found is None and var_kw and hf:
            found = options[0]
        return found

    mask, labels = pick(MASK_NAMES), pick(LABEL_NAMES)
    consts: dict[str, Any] = {}
    if "use_cache" in names or (var_kw and hf):
        consts["use_cache"] = False
    supplied = {ids.name, mask, labels, *consts}
    missing = [p.name for p in named if p.default is p.empty and p.name not in supplied]
    if missing:
        raise TraceError(
            f"cannot trace {name}.forward{sig}: revffn-fx calls it as "
            f"{name}.forward({ids.name}[, {mask or 'no mask'}][, {labels or 'no labels'}]) "
            f"and has no value for the required parameter(s) {', '.join(missing)}; give "
            "them defaults, or wrap the model in a module whose forward takes token ids "
            "(and optionally attention_mask, labels)")
    return Convention(name, ids.name, ids.kind is ids.POSITIONAL_ONLY, mask, labels, consts,
                      [p.name for p in positional], accepted=[p.name for p in named],
                      var_kw=var_kw)


class CausalLMEntry(nn.Module):
    """The traced root: calls the model in its own convention, returns (logits, loss)."""

    def __init__(self, model: nn.Module, convention: Convention) -> None:
        super().__init__()
        self.model = model
        self.convention = convention
        self.template: Any = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[Any, Any]:
        conv = self.convention
        kw = dict(conv.consts)
        if conv.mask is not None and attention_mask is not None:
            kw[conv.mask] = attention_mask
        if conv.labels is not None and labels is not None:
            kw[conv.labels] = labels
        # router logits are captured by the runtime's tap, never by the model's own forward:
        # a config asking for them (TRL's SFTTrainer sets it) would make the traced forward
        # compute a load-balancing loss from logits that tracing does not collect
        config = getattr(self.model, "config", None)
        asked = bool(getattr(config, "output_router_logits", False))
        if asked:
            config.output_router_logits = False
        try:
            if conv.ids_positional:
                out = self.model(input_ids, **kw)
            else:
                out = self.model(**{conv.ids: input_ids}, **kw)
        finally:
            if asked:
                config.output_router_logits = True
        self.template, logits, loss = split_output(out, conv.model_name)
        return logits, loss


@dataclass
class LayerCall:
    """How the model calls one decoder layer: which inputs are graph values."""

    hidden_name: str
    inputs: list[str]  # keyword names whose values come from the graph
    consts: dict[str, Any] = field(default_factory=dict)


def call_arguments(node: fx.Node, layer: nn.Module) -> tuple[Any, dict[str, Any]]:
    """A layer node's (hidden-state argument, other arguments by parameter name)."""
    names = forward_params(layer)
    hidden = names[0]
    kwargs = dict(node.kwargs)
    if len(node.args) > len(names):
        raise TraceError(f"{type(layer).__name__} is called with {len(node.args)} positional "
                         f"arguments but its forward names only {len(names)}")
    for name, value in zip(names[1:], node.args[1:]):
        kwargs[name] = value
    value = node.args[0] if node.args else kwargs.get(hidden)
    kwargs.pop(hidden, None)
    return value, kwargs


def layer_call_of(node: fx.Node, layer: nn.Module) -> LayerCall:
    """Read a layer's calling convention off its call_module node in the model graph."""
    _, kwargs = call_arguments(node, layer)
    inputs, consts = [], {}
    for k, v in kwargs.items():
        if any(isinstance(x, fx.Node) for x in pytree.tree_leaves(v)):
            inputs.append(k)
        else:
            consts[k] = v
    return LayerCall(forward_params(layer)[0], inputs, consts)
