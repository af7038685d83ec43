"""RevModel and ``transform``: the pipeline trace -> analyze -> rewrite -> inverse -> fuse.

A RevModel owns the original model (its weights keep their Hugging Face names) and the
new adapter parameters. Compiled graphs are built lazily for each (mode, inputs) key,
since torch.fx bakes ``self.training`` and optional inputs into a graph; the adapters are
shared by all of them.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from . import couplings
from .compiled import CompiledModel
from .errors import ConversionError, RevFFNError
from .frontend.ir import (
    HF_OUTPUT,
    TracedModel,
    rebuild_output,
    trace,
)
from .frontend.plan import Plan
from .options import TransformOptions, check_amplification, parse_layer_spec
from .passes.analyze import (
    analyze,
    describe_pairing,
    update_targets,
)
from .passes.couple import make_adapters
from .passes.cross_branch import attention_calls
from .passes.inverse import ReversibleSpec
from .passes.manager import Pass
from .passes.pipeline import scope_of
from .peft_support import follow_frozen_base, refresh_modules, refuse_peft_wrapper
from .runtime import fixed_point as fixed_points
from .runtime.fixed_point import fixed_point_tolerance  # noqa: F401 (was defined here)
from .runtime.layers import RuntimeOptions, wider_stream_dtype  # noqa: F401 (public here too)
from .runtime.router import RouterTap, find_routers
from .runtime.stack import RevStack

_BENIGN_KWARGS = {"use_cache", "return_dict"}
# accepted when None (PEFT's forward passes them so)
_NONE_KWARGS = {"inputs_embeds", "output_attentions", "output_hidden_states"}
#: the coupling name of the exact mode: no coupling, every decoder layer as it is under
#: activation checkpointing, with the lean loss head (the strongest non-reversible stack)
EXACT = couplings.EXACT


def parse_layers(spec: str | Sequence[int] | None, n: int) -> list[int] | None:
    """``"0-3,6"`` or a list of ints -> sorted layer indices; None means all."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = parse_layer_spec(spec)
    bad = [i for i in spec if not 0 <= i < n]
    if bad:
        raise RevFFNError(f"layer {bad[0]} out of range: the model has {n} layers (0-{n - 1})")
    return sorted(set(spec))


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding: ``get_input_embeddings()`` or the first nn.Embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb or next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    emb = input_embeddings(model)
    if emb is None:
        raise ConversionError("cannot tell the hidden size: no config.hidden_size and no "
                              "input embeddings")
    return emb.weight.shape[1]


class RevModel(nn.Module):
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
        if options is None:  # the keywords are the options, checked once, in one place
            options = TransformOptions.build(coupling=coupling, **option_kwargs)
        elif option_kwargs:
            raise RevFFNError(f"pass the options either as options= or as keywords, not both "
                              f"({sorted(option_kwargs)[0]})")
        # exact_streams' grid lives in float64 streams: resolved() picks them
        options = options.resolved(str(next(model.parameters()).dtype))
        self.transform_options = options  # what rebuilds this model (export records it)
        coupling, attention, loss_head = options.coupling, options.attention, options.loss_head
        layers = None if options.layers is None else list(options.layers)
        self.loss_head = loss_head
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
        n = len(traced.layers)
        wanted = parse_layers(layers, n)
        if coupling == EXACT and wanted:
            raise RevFFNError("the exact mode (coupling 'none') converts no layer: leave "
                              "out layers")
        chosen = [lp.index for lp in self.plan.layers if coupling != EXACT
                  and lp.convertible and (wanted is None or lp.index in wanted)]
        if wanted is not None:
            refused = [lp for lp in self.plan.layers if lp.index in wanted and not lp.convertible]
            if refused:
                lp = refused[0]
                raise ConversionError(
                    f"layer {lp.index} ({lp.qualname}) cannot be converted: {lp.reason}")
        if not chosen and coupling != EXACT:
            reasons = {lp.reason for lp in self.plan.layers if not lp.convertible}
            raise ConversionError("no convertible decoder layer"
                                  + (f": {sorted(reasons)[0]}" if reasons else ""))
        self.converted = chosen
        spec = couplings.get(coupling)
        if spec.scaled and not options.exact_streams:
            scaled = sum(spec.scaled_updates(len(self.plan.layers[i].sublayers))
                         for i in chosen)
            check_amplification(coupling, float(spec.scale(options.to_dict())), scaled,
                                options.stream_dtype or str(wider_stream_dtype(
                                    next(model.parameters()).dtype)).replace("torch.", ""))
        # the stream each residual update of a converted layer writes (0: X1, 1: X2):
        # alternating, across layer boundaries too (a layer with three updates ends on X1,
        # the next starts on X2); the plan says so in words (LayerPlan.pairing)
        self.update_targets: dict[int, list[int]] = {}
        start = 0
        for i in chosen:
            lp = self.plan.layers[i]
            if spec.whole_layer:  # the layer is one update (bdia)
                self.update_targets[i] = [start]
                lp.pairing = f"the whole layer -> X{start + 1} (reads X{2 - start})"
                start = (start + 1) % 2
                continue
            self.update_targets[i] = update_targets(lp, start)
            lp.pairing = describe_pairing(lp, start)
            start = (start + len(lp.sublayers)) % 2
        self.hidden_size = hidden_size_of(model)
        p = next(model.parameters())
        self.adapters = nn.ModuleDict()
        if spec.adapter_params:
            for i in chosen:
                self.adapters[str(i)] = make_adapters(self.hidden_size, p.dtype, p.device,
                                                      self.update_targets[i])
        follow_frozen_base(self)  # a frozen base (LoRA) freezes the adapters too
        routers, index = find_routers(model)
        tap = RouterTap(routers, index) if routers else None
        self.options = RuntimeOptions(router_tap=tap)
        # example attention calls for the cross-branch split, taken now: a forward during a
        # later lazy compile would fire the user's hooks
        cross_calls = attention_calls(
            traced, {i: self.plan.layers[i] for i in chosen}) if attention == "cross" else {}
        # the fixed point's default tolerance follows the dtype the branches compute in;
        # fp64's 1e-11 takes more steps of a slow contraction than fp32's 1e-6
        iters, tol = options.fixed_point_iters, options.fixed_point_tol
        self.options.fixed_point_iters = (iters if iters is not None
                                          else fixed_points.fixed_point_iters(p.dtype))
        self.options.fixed_point_tol = (tol if tol is not None
                                        else fixed_points.fixed_point_tolerance(p.dtype))
        self.options.stream_dtype = parse_stream_dtype(options.stream_dtype)
        self.options.exact_streams = options.exact_streams
        self.options.guard = options.guard
        # the compiled artefact (specs, graphs per mode, caches): not a submodule, it
        # shares self.model and self.adapters
        self.__dict__["compiled"] = CompiledModel(
            model, traced, chosen, self.update_targets, self.adapters, self.options, coupling,
            self.momentum, attention, options.checkpoint_rest or coupling == EXACT,
            self.user_passes, cross_calls)
        if attention == "cross" and p.device.type != "meta":
            self.probe_fixed_points()
        refresh_modules(self)  # records the module tree the traces were built on

    #: where the wrapped transformers model lives (PEFT and transformers' key mappings
    #: read it; ``rev.model`` is the original causal LM)
    base_model_prefix = "model"

    # -- compilation -------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def probe_fixed_points(self, input_ids: torch.Tensor | None = None) -> dict[int, str]:
        """Reconstruct every cross-branch layer's input from its output on a sample batch,
        as the backward would, and fall back to the plain coupling (closed-form inverse) in
        each layer whose fixed point does not converge to ``fixed_point_tol`` within half
        of ``fixed_point_iters`` (headroom for other batches). Returns (and adds to
        :attr:`cross_fallbacks`) the layers that fell back, with why. ``input_ids``: the
        batch (default: 2 x 16 seeded random ids)."""
        if self.attention != "cross":
            return {}
        if input_ids is None:
            vocab = int(getattr(self.config, "vocab_size", 0) or getattr(
                input_embeddings(self.model), "num_embeddings", 2))
            gen = torch.Generator().manual_seed(0)
            input_ids = torch.randint(0, vocab, (2, 16), generator=gen).to(
                next(self.model.parameters()).device)
        was = self.training
        self.eval()  # deterministic: no dropout, no sampled routing
        try:
            failed = self._probe(input_ids)
        finally:
            self.train(was)
        index = {self.traced.layers[i].qualname: i for i in self.converted}
        out = {}
        for name, (iters, res) in failed.items():
            i = index[name]
            out[i] = (f"the fixed point did not converge on a sample batch within half of "
                      f"fixed_point_iters={self.options.fixed_point_iters} (residual {res:.2g} "
                      f"after {iters} iterations, tolerance {self.options.fixed_point_tol:.0e})")
            self._cross[i] = out[i]
            self.cross_status[i] = f"closed form: {out[i]}"
            warnings.warn(f"layer {i} ({name}): cross-branch attention falls back to the plain "
                          f"coupling: {out[i]}", stacklevel=3)
        if out:  # recompile those layers with the plain coupling
            self.compiled.clear()
            self.cross_fallbacks.update(out)
        return out

    def _probe(self, input_ids: torch.Tensor) -> dict[str, tuple[int, float]]:
        from .runtime.fixed_point import fixed_point

        seen: dict[str, tuple[Any, Any, Any]] = {}
        graph = self.graph(False, has_mask=False, has_labels=False)
        handles = []
        for stack in (m for m in graph.modules() if isinstance(m, RevStack)):
            for layer in stack.layers:
                if all(u.closed_form for u in layer.updates):
                    continue

                def hook(m: Any, args: Any, out: Any, _n: str = layer.name) -> None:
                    seen[_n] = (m, list(out), args[1])

                handles.append(layer.register_forward_hook(hook))
        try:
            with torch.no_grad():
                graph(input_ids)
                failed = {}
                opts = self.options
                for name, (layer, y, ctx) in seen.items():
                    for u in reversed(layer.updates):
                        if u.closed_form:
                            y[u.target] = y[u.target] - u.run(y, ctx)
                            continue
                        # within half the budget: headroom for batches that converge slower
                        budget = max(1, opts.fixed_point_iters // 2)
                        x, iters, res = fixed_point(u, y, ctx, budget, opts.fixed_point_tol)
                        if not res <= opts.fixed_point_tol:
                            failed[name] = (iters, res)
                            break
                        y[u.target] = x
        finally:
            for h in handles:
                h.remove()
        return failed

    def specs(self, training: bool | None = None) -> dict[int, ReversibleSpec]:
        """The compiled coupling of every converted layer, for one mode."""
        return self.compiled.specs(self.training if training is None else training)

    def graph(self, training: bool | None = None, has_mask: bool = True,
              has_labels: bool = True, chunked_head: bool = False,
              hidden_only: bool = False, swap: bool = False) -> fx.GraphModule:
        """The compiled model-level graph (reversible stacks in place of layer runs; with
        ``chunked_head``, the memory-lean loss head in place of lm_head + loss; with
        ``hidden_only``, cut before lm_head: it returns ``(final hidden states, None)``)."""
        from .distributed import check_wrappers

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
    _specs = property(lambda self: self.compiled.specs_by_mode)
    _graphs = property(lambda self: self.compiled.graphs)
    _cross = property(lambda self: self.compiled.cross)

    # -- running -----------------------------------------------------------------------
    @contextmanager
    def plain_autograd(self, on: bool = True) -> Iterator[None]:
        """Run with ordinary autograd (activations kept): the reference for checks."""
        was = self.options.plain_autograd
        self.options.plain_autograd = on
        try:
            yield
        finally:
            self.options.plain_autograd = was

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # the model's own calling convention (its argument names and positional order)
        # becomes input_ids / attention_mask / labels
        args, kwargs = self.traced.convention.canonical(
            args, kwargs, ("input_ids", "attention_mask", "labels"))
        return super().__call__(*args, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, output_router_logits: bool = False,
                return_logits: bool = False, num_items_in_batch: Any = None,
                **kwargs: Any) -> Any:
        """Run the model; returns what the original model returns (transformers models: a
        ``MoeCausalLMOutputWithPast``; a hand-written model: its tensor, tuple or object),
        and takes its arguments by the original's names too. With labels, gradients
        enabled and ``loss_head="chunked"``, the loss comes from the memory-lean head and
        the logits are None unless ``return_logits=True``. ``num_items_in_batch`` (passed
        by the Trainer under gradient accumulation) makes the loss a sum divided by it, as
        in transformers."""
        from .inputs import check_attention_mask  # a mask of another shape: as HF reads it
        attention_mask = check_attention_mask(self.model, input_ids, attention_mask)
        unknown = {k for k, v in kwargs.items() if not (k in _NONE_KWARGS and v is None)}
        unknown -= _BENIGN_KWARGS
        # other keywords the model's forward takes (position_ids, ...) pass through to it:
        # the model's own forward then runs with the stacks swapped in (revffn_fx.swap)
        extra = {k: kwargs[k] for k in unknown}
        self.traced.convention.check_keywords(extra)
        swap = bool(extra) or self.traced.layers_only
        chunked = (self.loss_head == "chunked" and labels is not None and not return_logits
                   and torch.is_grad_enabled() and not swap)
        # the original head bakes a mean into the graph: with num_items_in_batch, take the
        # logits and apply the model's own loss function instead
        own_loss = (labels is not None and num_items_in_batch is not None and not chunked
                     and hasattr(self.model, "loss_function"))
        graph_labels = labels if not own_loss else None
        gm = self.graph(has_mask=attention_mask is not None, has_labels=graph_labels is not None,
                        chunked_head=chunked, swap=swap)
        kw = {k: v for k, v in (("attention_mask", attention_mask), ("labels", graph_labels))
              if v is not None}
        kw.update(extra)
        self.options.num_items_in_batch = num_items_in_batch
        try:
            (logits, loss), rec = self._run(gm, input_ids, kw, output_router_logits)
        finally:
            self.options.num_items_in_batch = None
        record = rec is not None
        if own_loss:
            loss = self.model.loss_function(logits, labels, logits.shape[-1],
                                            num_items_in_batch=num_items_in_batch)
        template = self.traced.template(None, attention_mask is not None,
                                        graph_labels is not None)
        if template is not HF_OUTPUT:  # a hand-written model: return what it returns
            out = rebuild_output(template, logits, loss)
            if (output_router_logits and hasattr(out, "__dict__")
                    and not isinstance(out, torch.Tensor)):
                try:  # an object output also carries the router logits it was asked for
                    out.router_logits = tuple(rec) if record else None
                except (AttributeError, TypeError):
                    pass
            return out
        if not record:
            return MoeCausalLMOutputWithPast(loss=loss, logits=logits)
        router_logits = tuple(rec)
        aux = self._aux_loss(router_logits, attention_mask)
        if aux is not None and loss is not None:
            loss = loss + self.aux_loss_coef * aux.to(loss.device)
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits,
                                         router_logits=router_logits)

    def backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 output_router_logits: bool = False, **kwargs: Any) -> MoeModelOutputWithPast:
        """The decoder without the LM head: ``.last_hidden_state`` (after the final norm,
        what lm_head reads) and, when asked, ``.router_logits``. The reversible stacks run
        as in :meth:`forward`. Trainers with their own fused LM-head loss (TRL's
        SFTTrainer) call this through :attr:`base_model`."""
        unknown = set(kwargs) - _BENIGN_KWARGS - {"output_hidden_states", "output_attentions"}
        if unknown:
            raise RevFFNError(f"unsupported argument(s) {sorted(unknown)}; the backbone takes "
                              "input_ids, attention_mask, output_router_logits")
        gm = self.graph(has_mask=attention_mask is not None, has_labels=False,
                        hidden_only=True)
        kw = {"attention_mask": attention_mask} if attention_mask is not None else {}
        (hidden, _), rec = self._run(gm, input_ids, kw, output_router_logits)
        return MoeModelOutputWithPast(last_hidden_state=hidden,
                                      router_logits=tuple(rec) if rec is not None else None)

    def _run(self, gm: fx.GraphModule, input_ids: torch.Tensor, kw: dict[str, Any],
             router_logits: bool) -> tuple[Any, list[torch.Tensor] | None]:
        """Call a compiled graph; with ``router_logits`` (and routers to tap), also return
        the router logits the stacks recorded, else None."""
        tap = self.options.router_tap
        if not (router_logits and tap is not None):
            return gm(input_ids, **kw), None
        self.options.record_router_logits = True
        try:
            with tap.recording() as rec:
                out = gm(input_ids, **kw)
        finally:
            self.options.record_router_logits = False
        return out, rec

    @property
    def base_model(self) -> Any:
        """A callable giving :meth:`backbone`'s output, where transformers models have their
        decoder (``model.base_model(...)``)."""
        return self.backbone

    # -- the parts of the transformers model API that trainers reach for ----------------
    @property
    def loss_type(self) -> str | None:
        """The wrapped model's loss type: the Trainer counts ``num_items_in_batch`` over the
        shifted labels only when this names the causal-LM loss (without it, it counts one
        token per sequence too many and every logged loss is too small)."""
        return getattr(self.model, "loss_type", None)

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:  # PEFT's generate sets it
        self.model.generation_config = value

    main_input_name = "input_ids"

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's (PEFT and transformers' generation utilities call it)."""
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    def can_generate(self) -> bool:
        return True

    def get_input_embeddings(self) -> nn.Module | None:
        fn = getattr(self.model, "get_input_embeddings", None)
        return fn() if fn is not None else None

    def get_output_embeddings(self) -> nn.Module | None:
        """The LM head (for models without transformers' accessor: the module the loss head
        pass looks for)."""
        fn = getattr(self.model, "get_output_embeddings", None)
        if fn is not None:
            return fn()
        target = self._lm_head_target().removeprefix("model.")
        return dict(self.model.named_modules()).get(target)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Any = None,
                                        every_n_layers: int | None = None,
                                        offload: bool = False, **kwargs: Any) -> None:
        """What ``TrainingArguments(activation_checkpointing=True)`` calls: the reversible
        stacks keep no activations anyway, so this checkpoints the decoder layers left out
        of them (``checkpoint_rest``); ``every_n_layers`` is not needed for that."""
        if offload:
            raise RevFFNError("activation offloading is not supported on a RevModel; the "
                              "reversible stacks already keep no per-layer activations")
        self.checkpoint_rest = True  # drops the graphs compiled without it

    def activation_checkpointing_disable(self) -> None:
        self.checkpoint_rest = False

    gradient_checkpointing_enable = activation_checkpointing_enable  # the pre-v5 names
    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpoint_rest

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags for the model card (forwarded to the wrapped transformers model)."""
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(tags)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face's ``generate`` (``GenerationMixin``: attention masks, sampling, beams,
        stopping criteria) with a KV cache, computing the coupling's inference function
        (for ``none`` the original model's cached path); see :mod:`revffn_fx.generation`.
        A hand-written model without ``generate`` is decoded greedily, without a cache."""
        from .generation import generate

        return generate(self, *args, **kwargs)

    def _aux_loss(self, router_logits: tuple[torch.Tensor, ...],
                  attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The model's own load-balancing loss function, applied to the captured logits."""
        fn = getattr(sys.modules.get(type(self.model).__module__), "load_balancing_loss_func", None)
        if fn is None or not router_logits or not hasattr(self.model, "num_experts"):
            return None
        return fn(router_logits, self.model.num_experts, self.model.num_experts_per_tok,
                  attention_mask)

    @property
    def aux_loss_coef(self) -> float:
        """The weight of the load-balancing loss, as the model's own forward uses it."""
        for name in ("router_aux_loss_coef", "aux_loss_coef"):
            value = getattr(self.model, name, None)
            if value is None:
                value = getattr(self.config, name, None)
            if value is not None:
                return float(value)
        return 0.0

    def extra_repr(self) -> str:
        return f"coupling={self.coupling!r}, converted={self.converted}"

    def report(self) -> str:
        """What the transform did, one line each: the layers converted or refused (why),
        how each layer's residual updates were paired across the two streams, and with
        cross-branch attention which layers use it or fell back to the plain coupling."""
        n = len(self.plan.layers)
        lines = [f"{type(self.model).__name__}: {len(self.converted)} of {n} decoder layers "
                 f"converted to {self.coupling} couplings"]
        for lp in self.plan.layers:
            if not lp.convertible:
                lines.append(f"  layer {lp.index} not converted: {lp.reason}")
            elif lp.index in self.converted:
                pairing = getattr(lp, "pairing", "")
                lines.append(f"  layer {lp.index}: {pairing or ', '.join(lp.kinds)}")
        if self.attention == "cross":
            self.specs()  # the status of every layer is known once compiled
            for i in self.converted:
                status = self.cross_status.get(i, "")
                if status == "cross":
                    lines.append(f"  layer {i}: cross-branch attention (fixed-point inverse)")
                else:
                    lines.append(f"  layer {i}: plain coupling, cross-branch attention off: "
                                 f"{status.removeprefix('closed form: ')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        """One line (``rev.model`` prints the module tree): the model type, the coupling,
        the converted layers, the parameter count (tied weights once) and the loss head."""
        kind = getattr(self.config, "model_type", None) or type(self.model).__name__
        n = sum(p.numel() for p in self.parameters())
        runs: list[list[int]] = []
        for i in sorted(self.converted):  # [0, 1, 2, 5] -> "0-2,5"
            if runs and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        span = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"
        return (f"RevModel({kind}, {self.coupling}: layers {span}"
                f" of {len(self.plan.layers)} reversible, {n:,} parameters, loss head "
                f"{self.loss_head})")

    def to_original(self) -> nn.Module:
        """The original Hugging Face model with the trained weights (it shares them with
        this RevModel): its ``save_pretrained`` writes a standard checkpoint any serving
        stack loads. Only for couplings whose function is the original architecture's
        (the exact mode ``none``, and ``bdia``, which evaluates as the original layers);
        in eval mode its logits equal this RevModel's."""
        spec = couplings.get(self.coupling)
        if not spec.preserves_function:
            keep = ", ".join(n for n, c in couplings.REGISTRY.items() if c.preserves_function)
            raise RevFFNError(f"the {self.coupling} coupling computes another function than "
                              f"the original architecture: its weights are not the original "
                              f"model's (couplings that train the original: {keep})")
        if len(self.adapters):
            raise RevFFNError("this RevModel has adapters of its own; the original "
                              "architecture has no place for them")
        return self.model

    # -- saving and loading (revffn_fx.export; imported lazily: it imports this module) --
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a model directory that :meth:`from_pretrained` / ``rf.load`` reads back
        bit for bit (``max_shard_size="2GB"``); see :func:`revffn_fx.export.save`. On a
        sharded (FSDP2) model call it on every rank: the weights are gathered to rank 0,
        which writes (:func:`revffn_fx.distributed.save_pretrained`)."""
        from .distributed import has_dtensors
        from .export import save

        if has_dtensors(self):  # FSDP2: gathered to rank 0, which writes
            from .distributed import save_pretrained

            return save_pretrained(self, save_directory, **kwargs)
        save(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **kwargs: Any) -> RevModel:
        """Load a directory written by :meth:`save_pretrained` or ``revffn-transform``."""
        from .export import load

        return load(directory, **kwargs)


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
    them with ``stream_dtype``, or for any depth ``exact_streams=True``: float64 streams on
    a fixed-point grid, the bits each division drops stored in forward, one byte per element
    per scaled update; docs/quality.md). ``layers``: indices or a spec like "0-3,6"
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
    """
    if isinstance(model, (str, os.PathLike)):
        from .frontend.loading import load_model

        model = load_model(model)
    refuse_peft_wrapper(model)
    if options is None:
        options = TransformOptions.build(coupling=coupling, layers=layers, **option_kwargs)
    elif option_kwargs or layers is not None or coupling != "revffn":
        raise RevFFNError("pass the options either as options= or as keywords, not both")
    return RevModel(model, passes=passes, options=options)


_STREAM_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_stream_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a floating torch dtype, or its name ("float64", "float32", ...)."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _STREAM_DTYPES:
        return _STREAM_DTYPES[value.replace("torch.", "")]
    raise RevFFNError(f"unknown stream dtype {value!r}; choose from {', '.join(_STREAM_DTYPES)}")


__all__ = ["RevModel", "transform", "TracedModel"]
