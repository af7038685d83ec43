"""Running a RevModel: its forward (the model's own calling convention in, the model's own
output out), the backbone without the LM head, router logits and the load-balancing loss,
and ``plain_autograd`` (ordinary autograd, the reference for checks).

:class:`RunningMixin` is one of the classes :class:`revffn_fx.model.RevModel` is made of;
it uses the RevModel's ``traced``, ``options``, ``graph()`` and ``model``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .errors import RevFFNError
from .frontend.outputs import HF_OUTPUT, rebuild_output
from .inputs import check_attention_mask

_BENIGN_KWARGS = {"use_cache", "return_dict"}
# accepted when None (PEFT's forward passes them so)
_NONE_KWARGS = {"inputs_embeds", "output_attentions", "output_hidden_states"}


class RunningMixin:
    """The forward and backbone of :class:`~revffn_fx.model.RevModel`."""

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
        # a mask of another shape: as HF reads it
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
