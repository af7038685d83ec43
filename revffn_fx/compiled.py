"""The compiled artefact of a RevModel, apart from the nn.Module users hold.

:class:`CompiledModel` owns what the compiler produces and caches: per mode, the coupling of
every converted layer (:class:`~revffn_fx.passes.inverse.ReversibleSpec`, from the layer pass
list), the model graphs per input key (from the model pass list), the pass records, and the
cross-branch attention state. It is built lazily: torch.fx bakes ``training`` and the
optional inputs into a graph. :class:`~revffn_fx.model.RevModel` holds one and runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from . import couplings
from .errors import ConversionError
from .frontend.calling_convention import call_arguments
from .frontend.ir import TracedModel
from .frontend.registry import facts_for
from .passes.analyze import analyze_layer, router_ids
from .passes.chunk_tokens import tokenwise_targets
from .passes.cross_branch import cross_attentions
from .passes.inverse import ReversibleSpec, generate_inverse
from .passes.manager import Pass, PassManager, PassRecord, snapshot
from .passes.pipeline import (
    CheckpointRest,
    ChunkLossHead,
    ChunkTokens,
    Couple,
    CutAtHead,
    Fuse,
    coupling_problem,
    layer_pipeline,
    model_pipeline,
)
from .runtime.chunking import ChunkedForwards
from .runtime.layers import RuntimeOptions
from .runtime.stack import RevStack

GraphKey = tuple[bool, bool, bool, bool, bool]  # training, mask, labels, chunked, hidden


class CompiledModel:
    """Specs and graphs of one transformed model, compiled on first use and cached.

    ``adapters`` are the RevModel's (its parameters); ``options`` the runtime options the
    stacks read; ``cross_calls`` example attention calls for the cross-branch split.
    ``attention`` and ``checkpoint_rest`` may change later: :meth:`clear` then drops what
    was compiled with the old values.
    """

    def __init__(self, model: nn.Module, traced: TracedModel, converted: Sequence[int],
                 update_targets: dict[int, list[int]], adapters: nn.ModuleDict,
                 options: RuntimeOptions, coupling: str, momentum: float | None,
                 attention: str, checkpoint_rest: bool, user_passes: Sequence[Pass],
                 cross_calls: dict[Any, Any]) -> None:
        self.model, self.traced, self.converted = model, traced, list(converted)
        self.update_targets, self.adapters, self.options = update_targets, adapters, options
        self.coupling, self.momentum, self.attention = coupling, momentum, attention
        self.checkpoint_rest, self.user_passes = checkpoint_rest, list(user_passes)
        self.cross_calls = cross_calls
        self.specs_by_mode: dict[bool, dict[int, ReversibleSpec]] = {}
        self.graphs: dict[GraphKey, fx.GraphModule] = {}
        self.pass_records: dict[str, list[PassRecord]] = {}
        self.loss_head_status = "not compiled yet"
        # per converted layer: "cross", or "closed form: <why the attention was not split>"
        self.cross_status: dict[int, str] = {}
        self.cross: dict[int, Any] = {}  # index -> CrossAttention or reason
        # layer index -> why its cross-branch attention fell back to the plain coupling
        self.cross_fallbacks: dict[int, str] = {}

    @property
    def spec(self) -> couplings.Coupling:
        """The coupling's declaration (revffn_fx.couplings)."""
        return couplings.get(self.coupling)

    @property
    def split(self) -> str:
        """The stacks' stream split ("copies" for the exact mode, which builds none)."""
        return self.spec.split or "copies"

    def clear(self, specs: bool = True) -> None:
        """Forget the compiled graphs (and with ``specs`` the layer couplings)."""
        self.graphs.clear()
        if specs:
            self.specs_by_mode.clear()

    def specs(self, training: bool) -> dict[int, ReversibleSpec]:
        """The compiled coupling of every converted layer, for one mode."""
        if training not in self.specs_by_mode:
            plans = self._layer_plans(training)
            cross: dict[int, Any] = {}
            if self.attention == "cross":
                cross, status = cross_attentions(self.traced, plans, self.cross, training,
                                                 self.cross_calls)
                self.cross_status.update(status)
            self.specs_by_mode[training] = {
                i: self._compile_layer(i, plan, cross.get(i), training)
                for i, plan in plans.items()}
        return self.specs_by_mode[training]

    def _layer_plans(self, training: bool) -> dict[int, Any]:
        """Each converted layer analysed in this mode (its graph may differ by mode)."""
        overrides = facts_for(getattr(getattr(self.model, "config", None), "model_type",
                                      None)).kind_overrides
        routers = router_ids(self.model)
        plans = {}
        for i in self.converted:
            plan = analyze_layer(self.traced.layers[i], overrides, training, routers)
            if not plan.convertible:
                raise ConversionError(f"layer {i} is not convertible in "
                                      f"{'train' if training else 'eval'} mode: {plan.reason}")
            plans[i] = plan
        return plans

    def _compile_layer(self, i: int, plan: Any, cross: Any, training: bool) -> ReversibleSpec:
        """The layer pass list (Couple, the user's passes), then the inverse."""
        adapters = self.adapters[str(i)] if self.spec.adapter_params else None
        couple = Couple(plan, self.coupling, adapters, cross, self.momentum,
                        self.update_targets[i][0])
        # the coupling invariant is checked after every pass: a user's pass that breaks it
        # is named here, not met as a generic error in the inverse
        pm = PassManager(layer_pipeline(couple, self.user_passes,
                                        ChunkTokens(plan, self.options)),
                         invariant=coupling_problem)
        gm = pm(snapshot(self.traced.layers[i].trace(training))).graph_module
        self.pass_records[f"layer{i}"] = pm.records
        return generate_inverse(gm)

    def graph(self, training: bool, has_mask: bool = True, has_labels: bool = True,
              chunked_head: bool = False, hidden_only: bool = False,
              check: Callable[[], None] | None = None, swap: bool = False) -> Any:
        """The model-level graph for these inputs (see :meth:`RevModel.graph`); ``check``
        runs before a new graph is compiled. With ``swap`` (always when the model-level
        forward cannot be traced) a :class:`~revffn_fx.swap.SwapRunner` instead: the
        model's own forward with the stacks swapped in, called the same way."""
        has_labels = has_labels and not hidden_only
        if swap or self.traced.layers_only:
            key: Any = ("swap", training, hidden_only)
        else:
            key = (training, has_mask, has_labels, chunked_head and has_labels, hidden_only)
        if key not in self.graphs:
            if check is not None:
                check()
            self.graphs[key] = (self._compile_runner(training, hidden_only) if key[0] == "swap"
                                else self._compile_graph(key))
        return self.graphs[key]

    def _compile_runner(self, training: bool, hidden_only: bool) -> nn.Module:
        """The model's own forward with the stacks swapped in (:mod:`revffn_fx.swap`)."""
        from .swap import SwapRunner

        layers = {i: spec.layer(self.traced.layers[i].qualname)
                  for i, spec in self.specs(training).items()}
        head = self.model.get_output_embeddings() if hasattr(
            self.model, "get_output_embeddings") else None
        head = head or dict(self.model.named_modules()).get(
            self.lm_head_target().removeprefix("model."))
        runner = SwapRunner(self.traced, layers, self.split,
                            self.options, self.checkpoint_rest, hidden_only, head, training)
        self.loss_head_status = ("original: the model's own forward runs (its decoder layers "
                                 "were traced on their own)")
        for stack in runner.stacks():
            stack.training = training
        return runner

    def _compile_graph(self, key: GraphKey) -> fx.GraphModule:
        """The model pass list: Fuse, CheckpointRest, ChunkLossHead, CutAtHead."""
        training, has_mask, has_labels, chunked, hidden_only = key
        layers = {}
        for i, spec in self.specs(training).items():
            lg = self.traced.layers[i]
            layers["model." + lg.qualname] = (spec.layer(lg.qualname), lg.call.inputs)
        split = self.split  # exact mode: no stack
        by_target = {"model." + lg.qualname: lg.module for lg in self.traced.layers}

        def bind(node: fx.Node) -> tuple[Any, dict[str, Any]]:
            return call_arguments(node, by_target[node.target])

        head = self.lm_head_target()
        chunk = ChunkLossHead(head, self.options) if chunked else None
        passes = model_pipeline(
            Fuse(layers, bind, split, self.options),
            CheckpointRest(by_target, self._chunked_forwards(training))
            if self.checkpoint_rest else None,
            chunk, CutAtHead(head) if hidden_only else None, self.user_passes)
        pm = PassManager(passes)
        gm = pm(snapshot(self.traced.trace(training, has_mask, has_labels))).graph_module
        self.pass_records["model"] = pm.records
        if chunk is not None:
            self.loss_head_status = chunk.status
        for stack in (m for m in gm.modules() if isinstance(m, RevStack)):
            stack.training = training  # not gm.train(): that would reach the shared layers
        return gm

    def _chunked_forwards(self, training: bool) -> dict[str, ChunkedForwards]:
        """Per layer left out of the stacks (checkpointed whole), its submodules the analysis
        classified token-wise, to run in token chunks (passes/chunk_tokens.py)."""
        overrides = facts_for(getattr(getattr(self.model, "config", None), "model_type",
                                      None)).kind_overrides
        routers = router_ids(self.model)
        out = {}
        for i, lg in enumerate(self.traced.layers):
            if i in self.converted:
                continue
            plan = analyze_layer(lg, overrides, training, routers)
            mods = [lg.module.get_submodule(t) for t in sorted(tokenwise_targets(plan))]
            if mods:
                out["model." + lg.qualname] = ChunkedForwards(mods, self.options)
        return out

    def lm_head_target(self) -> str:
        """The graph target of the output embeddings (``model.<name>``)."""
        head = self.model.get_output_embeddings() if hasattr(
            self.model, "get_output_embeddings") else None
        for name, mod in self.model.named_modules():
            if mod is head or (head is None and name.split(".")[-1] == "lm_head"):
                return "model." + name
        return "model.lm_head"
