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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .calling_convention import (
    CausalLMEntry,
    LayerCall,
    convention_of,
    layer_call_of,
)
from .capture import (
    Capture,
    capture,
    finish,
    forward_params,
    held_tensors,
    residual_shaped,
)
from .outputs import (
    HF_OUTPUT,
    rebuild_output,
    router_logits_off,
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
        names = forward_params(self.module)
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
        self.layers: list[LayerGraph] = self._layer_graphs(found, gm)
        self._read_examples()
        for layer in self.layers:  # fail now, not in a later pass, when a layer cannot be traced
            if not layer.handoff:  # (a layer handing state on is refused, traced or not)
                layer.trace()

    def _layer_graphs(self, found: list[tuple[str, nn.Module]], gm: fx.GraphModule | None
                      ) -> list[LayerGraph]:
        """One LayerGraph per decoder layer, its call read off the model-level graph (or,
        when that cannot be traced, off the example forward)."""
        layers = []
        if gm is not None:
            nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        for i, (qn, mod) in enumerate(found):
            if gm is not None:
                node = nodes.get("model." + qn)
                if node is None:
                    raise TraceError(f"decoder layer {qn} is not called by "
                                     f"{type(self.model).__name__}.forward")
                call = layer_call_of(node, mod)
            else:
                call = self._captured_call(i, qn)
            layers.append(LayerGraph(i, qn, mod, call, self.leaf_modules))
        return layers

    def _read_examples(self) -> None:
        """What the example forward says of each layer: the state it hands on, how many
        residual streams its hidden state holds side by side, an example call."""
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
            with router_logits_off(self.model):
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
                with router_logits_off(self.model):
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
            entry = CausalLMEntry(self.model, self.convention)
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
            with self.layer_graphs(), router_logits_off(self.model):
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
