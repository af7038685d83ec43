"""The IR: a traced causal LM as one model-level graph plus one graph per decoder layer.

Graphs depend on the module's mode (``self.training`` and Python constants are baked in
by torch.fx), and on which optional inputs are given, so they are traced lazily per
(mode, inputs) key. The IR knows nothing of couplings or passes.

The decoder layers, and how the model calls them, are read off one small forward of the
untouched model (:mod:`.capture`). When torch.fx cannot trace the model-level forward
(data-dependent Python control flow, an argument object it cannot put in a graph), only
the layers are traced (``TracedModel.layers_only``, the reason in ``model_error``) and the
model's own forward runs as written, with layer graphs or reversible stacks swapped in
(:mod:`revffn_fx.swap`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ..errors import RevFFNError, TraceError
from .capture import (
    Capture,
    capture,
    finish,
    forward_params,
    held_tensors,
    residual_shaped,
)
from .tracer import (
    is_norm,
    layer_candidates,
    layer_leaves,
    make_call_wrapper,
    strip_prefix,
    trace_module,
)


def graph_to_nx(gm: fx.GraphModule) -> nx.DiGraph:
    """A networkx view of an fx graph: one node per fx node, edges along data flow.

    Node attributes: ``op``, ``target`` (str), ``module_type`` (class name for
    call_module nodes, else None), ``index`` (position in the graph).
    """
    g = nx.DiGraph()
    modules = dict(gm.named_modules())
    for i, node in enumerate(gm.graph.nodes):
        mod = modules.get(node.target) if node.op == "call_module" else None
        target = node.target if isinstance(node.target, str) else getattr(
            node.target, "__name__", str(node.target))
        g.add_node(node.name, op=node.op, target=target,
                   module_type=type(mod).__name__ if mod is not None else None, index=i)
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


# the names a forward may give its labels, in the order they are looked for
LABEL_NAMES = ("labels", "targets", "target", "label")
MASK_NAMES = ("attention_mask",)


class _Slot:
    """A marker for where logits or loss sit in a model's output structure."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"

    # markers are compared by identity: copies (deepcopy, pickle) are the marker itself
    def __copy__(self) -> _Slot:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Slot:
        return self

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _slot_named, (self.name,)


LOGITS, LOSS, HF_OUTPUT = _Slot("logits"), _Slot("loss"), _Slot("transformers output")


def _slot_named(name: str) -> _Slot:
    return next(s for s in (LOGITS, LOSS, HF_OUTPUT) if s.name == name)


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


@contextmanager
def _router_logits_off(model: nn.Module) -> Iterator[None]:
    """Router logits are captured by the runtime's tap, never by the model's own forward:
    a config asking for them (TRL's SFTTrainer sets it) would make the model compute a
    load-balancing loss from logits recorded outside the reversible backward."""
    config = getattr(model, "config", None)
    asked = bool(getattr(config, "output_router_logits", False))
    if asked:
        config.output_router_logits = False
    try:
        yield
    finally:
        if asked:
            config.output_router_logits = True


def _depends_on(node: fx.Node, placeholder: str) -> bool:
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder" and n.target == placeholder:
            return True
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return False


def split_output(out: Any, model_name: str) -> tuple[Any, Any, Any]:
    """A traced model output as ``(template, logits, loss)``.

    transformers outputs give :data:`HF_OUTPUT`; a tensor is the logits; in a tuple or
    list the value computed from the labels is the loss and the other one the logits; an
    object or dict has ``logits`` (and maybe ``loss``) fields. Other traced values in the
    output are refused: revffn-fx runs a model for its logits and loss.
    """
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()  # type: ignore[assignment]
    if isinstance(out, ModelOutput):
        return HF_OUTPUT, out.logits, getattr(out, "loss", None)
    if isinstance(out, fx.Proxy):
        return LOGITS, out, None
    what = f"{model_name}.forward returns"
    if isinstance(out, (tuple, list)):
        items, logits, loss = list(out), None, None
        for k, v in enumerate(items):
            if not isinstance(v, fx.Proxy):
                continue
            is_loss = _depends_on(v.node, "labels")
            if (loss if is_loss else logits) is not None:
                raise TraceError(
                    f"{what} a {type(out).__name__} of {len(items)} with more than one "
                    f"{'loss' if is_loss else 'value not computed from the labels'}; "
                    "revffn-fx needs the outputs to be logits and (with labels) the loss")
            if is_loss:
                loss, items[k] = v, LOSS
            else:
                logits, items[k] = v, LOGITS
        if logits is None:
            raise TraceError(f"{what} no logits (no traced tensor in its {type(out).__name__})")
        template = type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        return template, logits, loss
    fields = (dict(out) if isinstance(out, dict) else
              {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
              if dataclasses.is_dataclass(out) else
              dict(vars(out)) if hasattr(out, "__dict__") else None)
    if fields is None or not isinstance(fields.get("logits"), fx.Proxy):
        raise TraceError(f"{what} a {type(out).__name__}: expected logits as a tensor, a "
                         "tuple (logits, loss), or an object or dict with a logits field")
    extra = [k for k, v in fields.items()
             if isinstance(v, fx.Proxy) and k not in ("logits", "loss")]
    if extra:
        raise TraceError(f"{what} traced value(s) {extra} besides logits and loss; "
                         "revffn-fx needs the outputs to be logits and the loss")
    logits, loss = fields["logits"], fields.get("loss")
    marks = {"logits": LOGITS, **({"loss": LOSS} if "loss" in fields else {})}
    if isinstance(out, dict):
        template = type(out)({**fields, **marks})
    elif dataclasses.is_dataclass(out):
        template = dataclasses.replace(out, **marks)
    else:
        template = copy.copy(out)
        template.__dict__.update(marks)
    return template, logits, loss


def rebuild_output(template: Any, logits: Any, loss: Any) -> Any:
    """The model's own output structure with the graph's logits and loss put back."""
    if template is HF_OUTPUT:
        return MoeCausalLMOutputWithPast(logits=logits, loss=loss)
    if template is LOGITS:
        return logits

    def put(v: Any) -> Any:
        return logits if v is LOGITS else loss if v is LOSS else v

    if isinstance(template, (tuple, list)):
        items = [put(v) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    if isinstance(template, dict):
        return type(template)({k: put(v) for k, v in template.items()})
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **{f.name: put(getattr(template, f.name))
                                                for f in dataclasses.fields(template)
                                                if getattr(template, f.name) in (LOGITS, LOSS)})
    out = copy.copy(template)
    out.__dict__.update({k: put(v) for k, v in vars(template).items()})
    return out


def logits_and_loss(out: Any) -> tuple[Any, Any]:
    """``(logits, loss)`` of whatever a (traced or reversible) model returned."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, dict) or hasattr(out, "logits"):
        get = out.get if isinstance(out, dict) else (lambda k, d=None: getattr(out, k, d))
        return get("logits"), get("loss", None)
    if isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        loss = next((v for v in tensors if v.dim() == 0), None)
        logits = next((v for v in tensors if v is not loss), None)
        return logits, loss
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def template_of(out: Any) -> Any:
    """The output structure of a real (not traced) model output, with :data:`LOGITS` and
    :data:`LOSS` markers where :func:`logits_and_loss` found them."""
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()  # type: ignore[assignment]
    if isinstance(out, ModelOutput):
        return HF_OUTPUT
    if isinstance(out, torch.Tensor):
        return LOGITS
    logits, loss = logits_and_loss(out)

    def mark(v: Any) -> Any:
        return LOGITS if v is logits and v is not None else LOSS if (
            v is loss and v is not None) else v

    if isinstance(out, (tuple, list)):
        items = [mark(v) for v in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, dict):
        return type(out)({k: mark(v) for k, v in out.items()} | (
            {"loss": LOSS} if "loss" in out else {}))
    marks = {"logits": LOGITS, **({"loss": LOSS} if hasattr(out, "loss") else {})}
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **marks)
    template = copy.copy(out)
    template.__dict__.update(marks)
    return template


class _CausalLMEntry(nn.Module):
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


def _forward_params(layer: nn.Module) -> list[str]:
    """Names of the positional parameters of the layer's forward (without ``self``)."""
    return forward_params(layer)


def call_arguments(node: fx.Node, layer: nn.Module) -> tuple[Any, dict[str, Any]]:
    """A layer node's (hidden-state argument, other arguments by parameter name)."""
    names = _forward_params(layer)
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
    return LayerCall(_forward_params(layer)[0], inputs, consts)


class LayerGraph:
    """One decoder layer: its module, how it is called, and its graph per mode."""

    def __init__(self, index: int, qualname: str, module: nn.Module, call: LayerCall,
                 leaf_modules: Sequence[str] = ()) -> None:
        self.index = index
        self.qualname = qualname
        self.module = module
        self.call = call
        self._leaf_modules = tuple(leaf_modules)
        self._graphs: dict[bool, fx.GraphModule] = {}
        # why this layer hands state to the next one ("" when it does not), from a forward
        self.handoff = ""
        # submodules kept whole because tracing into them failed (user-facing names)
        self.auto_leaves: set[str] = set()
        # an example call from a forward of the model: placeholder name -> value (or None)
        self.example: dict[str, Any] | None = None
        # residual streams the layer's hidden state holds side by side (hyper-connections
        # packing n copies of config.hidden_size features), from the example call
        self.streams = 1

    @property
    def placeholder_names(self) -> list[str]:
        return [self.call.hidden_name, *self.call.inputs]

    def trace(self, training: bool | None = None) -> fx.GraphModule:
        """The layer's graph for a mode (default: the module's current mode)."""
        mode = self.module.training if training is None else training
        if mode not in self._graphs:
            was = self.module.training
            self.module.train(mode)
            try:
                through = layer_leaves(self.module)
                wrapper = make_call_wrapper(self.module, self.placeholder_names,
                                            self.call.consts, attr="layer")
                gm = trace_module(wrapper, lambda m, qn: m not in through, self._leaf_modules,
                                  what=f"{self.qualname} ({type(self.module).__name__})",
                                  inner="layer", prefix=self.qualname,
                                  auto_leaves=self.auto_leaves)
                gm = strip_prefix(gm, self.module, "layer")
                # the wrapper call itself is not a node; the layer's code was inlined
                self._graphs[mode] = gm
            finally:
                self.module.train(was)
        return self._graphs[mode]

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.trace()

    def nx(self) -> nx.DiGraph:
        return graph_to_nx(self.graph_module)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run the layer's graph (module's current mode) on the arguments the model passes
        the layer module; constants the graph was traced with are not re-checked."""
        names = _forward_params(self.module)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        return self.trace()(*(bound.get(n) for n in self.placeholder_names))

    def __repr__(self) -> str:
        return f"LayerGraph({self.index}, {self.qualname!r}, {type(self.module).__name__})"


class TracedModel(nn.Module):
    """A causal LM traced with torch.fx: ``graph_module`` for the model, ``layers`` below.

    Calling it runs the traced graph: ``traced(input_ids, attention_mask=None,
    labels=None)`` returns an output with ``.logits`` and ``.loss``.
    """

    def __init__(self, model: nn.Module, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.leaf_modules = tuple(leaf_modules)
        candidates = layer_candidates(model)[:4]
        if not candidates:
            raise TraceError(
                f"no decoder layers found in {type(model).__name__}: expected a container "
                "(ModuleList, ModuleDict, Sequential, a list) of identical parameterised blocks")
        self.convention = convention_of(model)
        self._graphs: dict[tuple[bool, bool, bool], fx.GraphModule] = {}
        # modules of the model-level graph kept whole because tracing into them failed
        self.auto_leaves: set[str] = set()
        # the example forward of the untouched model (None when it could not run, e.g. on
        # the meta device): how each layer is called, state handed between layers; the
        # layers are the first candidate group whose modules carry the residual stream
        self.capture_error = ""  # why the example forward failed, when it did
        found, cap = self._capture(candidates)
        self.__dict__["capture"] = cap
        self.layer_names = [q for q, _ in found]
        # a plain list, not ids: a deepcopy then holds the copied layers (ids would name
        # the original's, and a copy's first trace would go into its layers)
        self.__dict__["_layer_modules"] = [m for _, m in found]
        # why the model-level forward cannot be traced ("" when it can): then the layers
        # are traced on their own and the model's forward runs as written, with converted
        # layers substituted (revffn_fx.swap)
        self.model_error = ""
        try:
            gm = self.trace()
        except TraceError as exc:
            if self.capture is None:
                raise TraceError(f"{exc}; nor could the model run once to trace its layers on "
                                 f"their own ({self.capture_error})") from exc
            self.model_error = str(exc)
            gm = None
        self.layers: list[LayerGraph] = []
        if gm is not None:
            nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        for i, (qn, mod) in enumerate(found):
            if gm is not None:
                node = nodes.get("model." + qn)
                if node is None:
                    raise TraceError(
                        f"decoder layer {qn} is not called by {type(model).__name__}.forward")
                call = layer_call_of(node, mod)
            else:
                call = self._captured_call(i, qn)
            self.layers.append(LayerGraph(i, qn, mod, call, self.leaf_modules))
        for i, layer in enumerate(self.layers):
            rec = self.capture.layers[i] if self.capture is not None else None
            if rec is not None:
                layer.handoff = rec.handoff
                width = getattr(self.config, "hidden_size", None)
                if (isinstance(width, int) and width and isinstance(rec.hidden, torch.Tensor)
                        and rec.hidden.shape[-1] % width == 0
                        and rec.hidden.shape[-1] // width > 1):
                    layer.streams = rec.hidden.shape[-1] // width  # side by side
                layer.example = {layer.call.hidden_name: rec.hidden,
                                 **{k: rec.kwargs.get(k) for k in layer.call.inputs}}
        for layer in self.layers:  # fail now, not in a later pass, when a layer cannot be traced
            if not layer.handoff:  # (a layer handing state on is refused, traced or not)
                layer.trace()

    @property
    def layers_only(self) -> bool:
        """The model-level forward could not be traced: only the layers are."""
        return bool(self.model_error)

    def _capture(self, candidates: list[list[tuple[str, nn.Module]]]
                 ) -> tuple[list[tuple[str, nn.Module]], Capture | None]:
        """One forward of the untouched model with hooks on the candidate layers: the first
        candidate group whose every module takes and returns the residual stream, and its
        capture. Without a forward (it fails, e.g. on the meta device) the first candidate
        and None (then the model-level trace alone says how layers are called)."""
        conv = self.convention

        def call(ids: torch.Tensor) -> Any:
            kw = dict(conv.consts)
            return self.model(ids, **kw) if conv.ids_positional else self.model(
                **{conv.ids: ids}, **kw)

        modules = list({id(m): m for group in candidates for _, m in group}.values())
        cap = None
        try:
            with _router_logits_off(self.model):
                cap = capture(self.model, modules, call)
        except Exception as exc:  # noqa: BLE001 - the model-level trace may do without it
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.capture_error = f"{type(exc).__name__}: {msg}"
        if cap is None and next(self.model.parameters()).is_meta:
            # layers that cannot run on the meta device: record the calls of the first
            # candidate's layers with their bodies stubbed out
            modules = [m for _, m in candidates[0]]
            candidates = candidates[:1]
            try:
                with _router_logits_off(self.model):
                    cap = capture(self.model, modules, call, stub=True)
            except Exception:  # noqa: BLE001 - as above
                cap = None
        if cap is None:
            return candidates[0], None
        index = {id(m): i for i, m in enumerate(modules)}
        for group in candidates:
            records = [cap.layers[index[id(m)]] for _, m in group]
            if all(residual_shaped(r) for r in records):
                return group, finish(records, cap.output, cap.ids)
        group = candidates[0]
        return group, finish([cap.layers[index[id(m)]] for _, m in group], cap.output, cap.ids)

    def _captured_call(self, i: int, qn: str) -> LayerCall:
        """A layer's calling convention read off the example forward."""
        rec = self.capture.layers[i]
        if rec is None:
            raise TraceError(f"decoder layer {qn} is not called by "
                             f"{type(self.model).__name__}.forward (and the model-level "
                             f"forward cannot be traced: {self.model_error})")
        if not residual_shaped(rec):
            kind = type(self._layer_modules[i]).__name__
            raise TraceError(f"{qn} ({kind}) does not return a tensor of the "
                             "shape of its input, so it is not a residual decoder layer; the "
                             f"model-level forward cannot be traced either: {self.model_error}")
        inputs, consts = [], {}
        for k, v in rec.kwargs.items():
            # tensors, and argument objects holding tensors, are inputs of the layer graph
            if any(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(v)) or held_tensors(v):
                inputs.append(k)
            else:
                consts[k] = v
        return LayerCall(rec.hidden_name, inputs, consts)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def _layer_set(self) -> set[int]:
        return {id(m) for m in self._layer_modules}

    def _leaf(self, m: nn.Module, qn: str) -> bool | None:
        if id(m) in self._layer_set or is_norm(m):
            return True
        # token embeddings stay one node even when subclassed (gemma scales them), so the
        # graph shows them and hooks on them fire
        if isinstance(m, nn.Embedding):
            return True
        # parameter-free helpers (rotary embeddings) compute constants: keep them whole
        if not any(True for _ in m.parameters()) and any(True for _ in m.buffers()):
            return True
        return None

    def trace(self, training: bool | None = None, has_mask: bool = True,
              has_labels: bool = True) -> fx.GraphModule:
        """The model-level graph for one mode and set of optional inputs."""
        if getattr(self, "model_error", ""):
            raise TraceError(f"{self.model_error}; its decoder layers are traced on their own "
                             "and the model's forward runs as written (see revffn_fx.swap)")
        mode = self.model.training if training is None else training
        # inputs the model's forward does not take are never graph inputs
        has_mask = has_mask and self.convention.mask is not None
        has_labels = has_labels and self.convention.labels is not None
        key = (mode, has_mask, has_labels)
        if key not in self._graphs:
            concrete: dict[str, Any] = {}
            if not has_mask:
                concrete["attention_mask"] = None
            if not has_labels:
                concrete["labels"] = None
            was = self.model.training
            self.model.train(mode)
            entry = _CausalLMEntry(self.model, self.convention)
            try:
                gm = trace_module(entry, self._leaf, self.leaf_modules,
                                  what=type(self.model).__name__, concrete_args=concrete or None,
                                  patch_masks_of=self.model, inner="model",
                                  protected=self._layer_set,
                                  tried=self.convention.describe(has_mask, has_labels),
                                  auto_leaves=self.auto_leaves)
            finally:
                self.model.train(was)
            self._graphs[key] = gm
            self.convention.templates[key] = entry.template
        return self._graphs[key]

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.trace()

    def nx(self) -> nx.DiGraph:
        return graph_to_nx(self.graph_module)

    @contextmanager
    def layer_graphs(self) -> Iterator[None]:
        """Within the block, decoder layers run their traced graphs instead of their own
        forward (wherever the model is called): a check that the layer graphs are faithful.
        Layers that hand state to the next run their own forward."""
        layers = [layer for layer in self.layers if not layer.handoff]
        for layer in layers:  # trace both modes now: tracing calls the layer's forward
            layer.trace(True)
            layer.trace(False)
        saved = [(layer.module, layer.module.__dict__.get("forward")) for layer in layers]
        try:
            for layer in layers:
                layer.module.forward = layer.run
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd

    def template(self, training: bool | None = None, has_mask: bool = True,
                 has_labels: bool = True) -> Any:
        """The model's output structure for one graph key (see :func:`rebuild_output`)."""
        mode = self.model.training if training is None else training
        key = (mode, has_mask and self.convention.mask is not None,
               has_labels and self.convention.labels is not None)
        if self.layers_only or (key in self.convention.templates and key not in self._graphs):
            return self.convention.templates.get(key, HF_OUTPUT)  # set by the run
        self.trace(mode, has_mask, has_labels)
        return self.convention.templates[key]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # arguments in the model's own convention (its names, its positional order)
        args, kwargs = self.convention.canonical(args, kwargs, ("input_ids", "attention_mask",
                                                                "labels"))
        return super().__call__(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run the traced graph; returns what the model returns (for transformers models a
        ``MoeCausalLMOutputWithPast`` with ``.logits`` and ``.loss``)."""
        kwargs.pop("use_cache", None)
        if kwargs or self.layers_only:
            # the model's own forward, each decoder layer running its traced graph
            self.convention.check_keywords(kwargs)
            with self.layer_graphs(), _router_logits_off(self.model):
                return self.convention.call(self.model, input_ids, attention_mask, labels,
                                            **kwargs)
        has_mask, has_labels = attention_mask is not None, labels is not None
        gm = self.trace(has_mask=has_mask, has_labels=has_labels)
        kw = {k: v for k, v in (("attention_mask", attention_mask), ("labels", labels))
              if v is not None}
        logits, loss = gm(input_ids, **kw)
        return rebuild_output(self.template(None, has_mask, has_labels), logits, loss)


def trace(model: nn.Module, leaf_modules: Sequence[str] = ()) -> TracedModel:
    """Trace a causal LM into a :class:`TracedModel`.

    ``leaf_modules``: class names or qualified names of modules to keep whole (not traced
    through), for modules torch.fx cannot trace.
    """
    return TracedModel(model, leaf_modules)
