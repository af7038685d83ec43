"""RevModel and ``transform``: the pipeline trace -> analyze -> rewrite -> inverse -> fuse.

A RevModel owns the original model (its weights keep their Hugging Face names) and the
new adapter parameters. Compiled graphs are built lazily for each (mode, inputs) key,
since torch.fx bakes ``self.training`` and optional inputs into a graph; the adapters are
shared by all of them.

The class is made of parts, each in its own module: what building it decides
(:mod:`.model_setup`), running it (:mod:`.model_running`), the transformers API it offers
with saving and loading (:mod:`.model_transformers`), reports and the fixed-point probe
(:mod:`.model_inspection`), what it does about PEFT (:mod:`.model_peft`). This module
holds the construction, the compiled artefact's accessors and :func:`transform`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn

from . import couplings
from .compiled import CompiledModel
from .errors import RevFFNError
from .frontend.ir import TracedModel, trace
from .frontend.loading import load_model
from .frontend.plan import Plan
from .model_inspection import InspectionMixin
from .model_peft import follow_frozen_base, refresh_modules, refuse_peft_wrapper
from .model_running import RunningMixin
from .model_setup import (
    check_scaled_streams,
    checked_options,
    choose_layers,
    coupling_adapters,
    hidden_size_of,
    pair_updates,
    parse_layers,
    runtime_options,
)
from .model_transformers import TransformersSurfaceMixin
from .options import TransformOptions
from .passes.analyze import analyze
from .passes.cross_branch import attention_calls
from .passes.inverse import ReversibleSpec
from .passes.manager import Pass
from .passes.pipeline import scope_of
from .runtime.stack import RevStack
from .wrapper_checks import check_wrappers

#: the coupling name of the exact mode: no coupling, every decoder layer as it is under
#: activation checkpointing, with the lean loss head (the strongest non-reversible stack)
EXACT = couplings.EXACT


class RevModel(RunningMixin, TransformersSurfaceMixin, InspectionMixin, nn.Module):
    """A causal LM whose convertible decoder layers run as reversible couplings.

    ``rev(input_ids, attention_mask=None, labels=None, output_router_logits=False)``
    returns ``.logits``, ``.loss``, ``.aux_loss``. In training with gradients enabled the
    reversible stacks use the generated backward; in eval mode or under no_grad they run
    as plain modules; ``with rev.plain_autograd():`` forces ordinary autograd.
    """

    def __init__(self, model: nn.Module, coupling: str = "revffn",
                 passes: Sequence[Pass] | None = None, options: TransformOptions | None = None,
                 **option_kwargs: Any) -> None:
        super().__init__()
        options = checked_options(model, coupling, options, option_kwargs)
        self.transform_options = options  # what rebuilds this model (export records it)
        coupling = options.coupling
        self.loss_head = options.loss_head
        self.model = model
        self.coupling = coupling
        # the fraction of the overwritten stream kept by the momentum and meft couplings
        self.momentum: float | None = options.momentum if options.momentum is not None \
            else options.bdia_gamma  # bdia: |gamma|, what its updates keep
        self.user_passes = list(passes or [])
        for user_pass in self.user_passes:
            scope_of(user_pass)  # a bad scope is refused now, not at the first compile
        traced = trace(model, options.leaf_modules)
        self.__dict__["traced"] = traced  # not a submodule: it shares self.model
        self.plan: Plan = analyze(traced)
        self.converted = chosen = choose_layers(self.plan, coupling, options.layers)
        spec = couplings.get(coupling)
        p = next(model.parameters())
        check_scaled_streams(spec, options, self.plan, chosen, p.dtype)
        self.update_targets: dict[int, list[int]] = pair_updates(self.plan, chosen, spec)
        self.hidden_size = hidden_size_of(model)
        self.adapters = coupling_adapters(spec, self.update_targets, self.hidden_size, p)
        follow_frozen_base(self)  # a frozen base (LoRA) freezes the adapters too
        self.options = runtime_options(options, model)
        self._compile(options, chosen)
        if self.attention == "cross" and p.device.type != "meta":
            self.probe_fixed_points()
        refresh_modules(self)  # records the module tree the traces were built on

    def _compile(self, options: TransformOptions, chosen: list[int]) -> None:
        """Set up the compiled artefact (specs, graphs per mode, caches): not a submodule,
        it shares self.model and self.adapters."""
        # example attention calls for the cross-branch split, taken now: a forward during a
        # later lazy compile would fire the user's hooks
        cross_calls = attention_calls(
            self.traced, {i: self.plan.layers[i] for i in chosen}
        ) if options.attention == "cross" else {}
        self.__dict__["compiled"] = CompiledModel(
            self.model, self.traced, chosen, self.update_targets, self.adapters, self.options,
            self.coupling, self.momentum, options.attention,
            options.checkpoint_rest or self.coupling == EXACT, self.user_passes, cross_calls)

    # -- compilation -------------------------------------------------------------------

    def specs(self, training: bool | None = None) -> dict[int, ReversibleSpec]:
        """The compiled coupling of every converted layer, for one mode."""
        return self.compiled.specs(self.training if training is None else training)

    def graph(self, training: bool | None = None, has_mask: bool = True,
              has_labels: bool = True, chunked_head: bool = False,
              hidden_only: bool = False, swap: bool = False) -> fx.GraphModule:
        """The compiled model-level graph (reversible stacks in place of layer runs; with
        ``chunked_head``, the memory-lean loss head in place of lm_head + loss; with
        ``hidden_only``, cut before lm_head: it returns ``(final hidden states, None)``)."""
        refresh_modules(self)  # modules replaced since (PEFT): compile again
        # compiled under FSDP1 it would train the original layers: checked before compiling
        return self.compiled.graph(self.training if training is None else training, has_mask,
                                   has_labels, chunked_head, hidden_only,
                                   check=lambda: check_wrappers(self), swap=swap)

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.graph()

    def _lm_head_target(self) -> str:
        return self.compiled.lm_head_target()

    def stacks(self, training: bool | None = None) -> list[RevStack]:
        gm = self.graph(training)
        return [m for m in gm.modules() if isinstance(m, RevStack)]

    # -- the compiled artefact's state, read (and for two settings written) through here --
    attention = property(lambda self: self.compiled.attention,
                         lambda self, v: setattr(self.compiled, "attention", v),
                         doc="'plain' or 'cross' (cross-branch attention)")

    @property
    def checkpoint_rest(self) -> bool:
        """Whether the layers outside the stacks run under activation checkpointing."""
        return self.compiled.checkpoint_rest

    @checkpoint_rest.setter
    def checkpoint_rest(self, on: bool) -> None:
        if on != self.compiled.checkpoint_rest:
            self.compiled.checkpoint_rest = on
            self.compiled.clear(specs=False)

    cross_status = property(lambda self: self.compiled.cross_status)
    cross_fallbacks = property(lambda self: self.compiled.cross_fallbacks)
    pass_records = property(lambda self: self.compiled.pass_records)
    loss_head_status = property(lambda self: self.compiled.loss_head_status)
    _graphs = property(lambda self: self.compiled.graphs)
    _cross = property(lambda self: self.compiled.cross)


def transform(model: nn.Module | str | os.PathLike[str], coupling: str = "revffn",
              layers: str | Sequence[int] | None = None, passes: Sequence[Pass] | None = None,
              options: TransformOptions | None = None, **option_kwargs: Any) -> RevModel:
    """Rewrite a causal LM (or a local model directory) into a :class:`RevModel`.

    The keywords after ``passes`` are the transform's options; they build one checked
    :class:`~revffn_fx.options.TransformOptions` (``rev.transform_options``), which can be
    given instead as ``options`` (then those keywords are not read).

    ``coupling``: "revffn" (halves + adapters, the paper's block), "revnet" (two
    full-width copies, no new parameters), or "momentum" / "meft" (no new parameters;
    they keep the pretrained function to within ``momentum``, the fraction g of the
    overwritten stream each update keeps, default 1/8; their inverse divides by g, so pair
    them with ``stream_dtype``, or for any depth ``exact_streams=True`` (their default):
    streams on a fixed-point grid, the bits each division drops stored in forward, packed,
    log2(1/g) bits per element per scaled update; the grid is int32 units of 2**-16 for
    16-bit models (4 bytes) and float64 values on 2**-32 for fp32 (8 bytes),
    runtime/grid.py; docs/quality.md). ``layers``: indices or a spec like "0-3,6"
    (default: every convertible layer). ``passes``: extra passes run on each coupling graph
    after the built-in rewrite. ``leaf_modules``: modules torch.fx should not trace into.
    ``coupling="none"`` is the exact mode: no layer is rewritten, the model computes what it
    computed before, every decoder layer runs under activation checkpointing (turn it off
    with ``rev.activation_checkpointing_disable()``) with the lean loss head; the fused
    optimizer works as with the couplings.
    ``checkpoint_rest``: run the layers left out of the stacks under activation
    checkpointing. ``loss_head``: "chunked" (default: the memory-lean head when labels
    are given and logits are not asked for) or "original". ``attention``: "plain" or
    "cross" (revffn only: F's queries from X1, keys/values from X2, the paper's block; X1
    is then reconstructed by fixed-point iteration, at most ``fixed_point_iters`` steps to
    a relative residual of ``fixed_point_tol``; layers whose attention cannot be split keep
    the closed form, see ``rev.cross_status``). ``stream_dtype``: carry the coupled
    streams in a wider dtype than the model's (e.g. "float64" for an fp32 model, "float32"
    for bf16) so that the backward reconstructs them without accumulated rounding error;
    branches still compute in the model's dtype. Worth it when the adapters have large
    gains (after :func:`revffn_fx.calibrate`); costs one wider copy of the streams.
    "int32": exact streams in 4 bytes for any model (the default grid of 16-bit models;
    over fp32 weights it rounds the streams to 2**-16, coarser than float64's 2**-32).
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    refuse_peft_wrapper(model)
    if options is None:
        options = TransformOptions.build(coupling=coupling, layers=layers, **option_kwargs)
    elif option_kwargs or layers is not None or coupling != "revffn":
        raise RevFFNError("pass the options either as options= or as keywords, not both")
    return RevModel(model, passes=passes, options=options)


__all__ = ["RevModel", "transform", "TracedModel", "EXACT", "parse_layers"]
