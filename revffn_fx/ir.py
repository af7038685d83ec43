"""The IR: a traced causal LM as one model-level graph plus one graph per decoder layer.

Graphs depend on the module's mode (``self.training`` and Python constants are baked in
by torch.fx), and on which optional inputs are given, so they are traced lazily per
(mode, inputs) key. The IR knows nothing of couplings or passes.
"""

from __future__ import annotations

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

from .errors import TraceError
from .tracer import (
    find_decoder_layers,
    is_norm,
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


class _CausalLMEntry(nn.Module):
    """The traced root: calls the model by keyword and returns (logits, loss)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @contextmanager
    def layer_graphs(self) -> Iterator[None]:
        """Within the block, decoder layers run their traced graphs instead of their own
        forward (wherever the model is called): a check that the layer graphs are faithful."""
        for layer in self.layers:  # trace both modes now: tracing calls the layer's forward
            layer.trace(True)
            layer.trace(False)
        saved = [(layer.module, layer.module.__dict__.get("forward")) for layer in self.layers]
        try:
            for layer in self.layers:
                layer.module.forward = layer.run
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[Any, Any]:
        # router logits are captured by the runtime's tap, never by the model's own forward:
        # a config asking for them (TRL's SFTTrainer sets it) would make the traced forward
        # compute a load-balancing loss from logits that tracing does not collect
        config = getattr(self.model, "config", None)
        asked = bool(getattr(config, "output_router_logits", False))
        if asked:
            config.output_router_logits = False
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                             use_cache=False)
        finally:
            if asked:
                config.output_router_logits = True
        return out.logits, out.loss


@dataclass
class LayerCall:
    """How the model calls one decoder layer: which inputs are graph values."""

    hidden_name: str
    inputs: list[str]  # keyword names whose values come from the graph
    consts: dict[str, Any] = field(default_factory=dict)


def _forward_params(layer: nn.Module) -> list[str]:
    """Names of the positional parameters of the layer's forward (without ``self``)."""
    params = inspect.signature(inspect.unwrap(type(layer).forward)).parameters.values()
    names = [p.name for p in params
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]
    return names or ["hidden_states"]


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
                                  inner="layer", prefix=self.qualname)
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
        found = find_decoder_layers(model)
        if not found:
            raise TraceError(
                f"no decoder layers found in {type(model).__name__}: expected an nn.ModuleList "
                "of identical parameterised blocks")
        self.layer_names = [q for q, _ in found]
        self._layer_set = {id(m) for _, m in found}
        self._graphs: dict[tuple[bool, bool, bool], fx.GraphModule] = {}
        gm = self.trace()
        nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        self.layers: list[LayerGraph] = []
        for i, (qn, mod) in enumerate(found):
            node = nodes.get("model." + qn)
            if node is None:
                raise TraceError(
                    f"decoder layer {qn} is not called by {type(model).__name__}.forward")
            self.layers.append(LayerGraph(i, qn, mod, layer_call_of(node, mod), self.leaf_modules))
        for layer in self.layers:  # fail now, not in a later pass, when a layer cannot be traced
            layer.trace()

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

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
        mode = self.model.training if training is None else training
        key = (mode, has_mask, has_labels)
        if key not in self._graphs:
            concrete: dict[str, Any] = {}
            if not has_mask:
                concrete["attention_mask"] = None
            if not has_labels:
                concrete["labels"] = None
            was = self.model.training
            self.model.train(mode)
            try:
                gm = trace_module(_CausalLMEntry(self.model), self._leaf, self.leaf_modules,
                                  what=type(self.model).__name__, concrete_args=concrete or None,
                                  patch_masks_of=self.model, inner="model",
                                  protected=self._layer_set)
            finally:
                self.model.train(was)
            self._graphs[key] = gm
        return self._graphs[key]

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.trace()

    def nx(self) -> nx.DiGraph:
        return graph_to_nx(self.graph_module)

    @contextmanager
    def layer_graphs(self) -> Iterator[None]:
        """Within the block, decoder layers run their traced graphs instead of their own
        forward (wherever the model is called): a check that the layer graphs are faithful."""
        for layer in self.layers:  # trace both modes now: tracing calls the layer's forward
            layer.trace(True)
            layer.trace(False)
        saved = [(layer.module, layer.module.__dict__.get("forward")) for layer in self.layers]
        try:
            for layer in self.layers:
                layer.module.forward = layer.run
            yield
        finally:
            for mod, fwd in saved:
                if fwd is None:
                    del mod.forward
                else:
                    mod.forward = fwd

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MoeCausalLMOutputWithPast:
        gm = self.trace(has_mask=attention_mask is not None, has_labels=labels is not None)
        kw = {k: v for k, v in (("attention_mask", attention_mask), ("labels", labels))
              if v is not None}
        logits, loss = gm(input_ids, **kw)
        return MoeCausalLMOutputWithPast(logits=logits, loss=loss)


def trace(model: nn.Module, leaf_modules: Sequence[str] = ()) -> TracedModel:
    """Trace a causal LM into a :class:`TracedModel`.

    ``leaf_modules``: class names or qualified names of modules to keep whole (not traced
    through), for modules torch.fx cannot trace.
    """
    return TracedModel(model, leaf_modules)
