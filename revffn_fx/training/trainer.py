"""transformers.Trainer with the optimizer step fused into the backward.

Use ``FusedOptimizerTrainer`` in place of ``Trainer``; everything else in a training
script stays. The Trainer's own optimizer choice (``args.optim``, learning rate, betas,
weight decay with its no-decay groups) is kept, one instance per parameter.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Trainer

from .fused import FusedOptimizer, ddp_class, fuse_optimizer


class FusedOptimizerTrainer(Trainer):
    """A Trainer whose optimizer steps each parameter during backward.

    - Global-norm clipping is impossible (gradients never coexist): ``max_grad_norm`` is
      turned into per-parameter clipping, with a warning.
    - Gradient accumulation: gradients are kept on every micro-batch but the last, and the
      step happens during the last micro-batch's backward.
    - Checkpoints save and restore the per-parameter optimizer states.
    - Under DDP the step runs on the averaged gradients (DDP communication hook); under
      FSDP2 (a model sharded with ``revffn_fx.distributed.shard``) after each layer's
      reduce-scatter.
    """

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            decay = set(self.get_decay_parameter_names(opt_model))
            overrides = {p: {"weight_decay": self.args.weight_decay if n in decay else 0.0}
                         for n, p in opt_model.named_parameters() if p.requires_grad}
            clip = None
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                warnings.warn("the fused optimizer cannot clip by the global gradient norm; "
                              f"clipping each parameter's gradient to {self.args.max_grad_norm} "
                              "instead", stacklevel=2)
                clip = self.args.max_grad_norm
                self.args.max_grad_norm = 0.0
            self.optimizer = fuse_optimizer(opt_model, cls, clip_per_param=clip,
                                            overrides=overrides, **kwargs)
        return self.optimizer

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        opt = self.optimizer
        inner = getattr(opt, "optimizer", opt)  # accelerate wraps optimizers
        if isinstance(inner, FusedOptimizer):
            inner.accumulate = not self.accelerator.sync_gradients
            ddp = ddp_class()
            if ddp is not None and isinstance(model, ddp) and inner.ddp is not model:
                inner.attach_ddp(model)  # the Trainer wrapped the model after creating it
        return super().training_step(model, inputs, num_items_in_batch)
