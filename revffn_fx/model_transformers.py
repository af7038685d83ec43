"""The parts of the transformers model API a RevModel offers, for trainers, PEFT and
serving: ``config``, generation (``generate``, and what PEFT's generate reads), the
embeddings, activation checkpointing switches, model tags, ``to_original``, and saving and
loading (``save_pretrained`` / ``from_pretrained`` through :mod:`revffn_fx.serialization`).

:class:`TransformersSurfaceMixin` is one of the classes :class:`revffn_fx.model.RevModel`
is made of.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from . import couplings
from .errors import RevFFNError
from .generation import generate
from .serialization.rebuilding import rebuild
from .serialization.saving import save
from .sharded_save import has_dtensors
from .sharded_save import save_pretrained as save_sharded


class TransformersSurfaceMixin:
    """What transformers, PEFT and trainers call on :class:`~revffn_fx.model.RevModel`."""

    #: where the wrapped transformers model lives (PEFT and transformers' key mappings
    #: read it; ``rev.model`` is the original causal LM)
    base_model_prefix = "model"

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

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
        return generate(self, *args, **kwargs)

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

    # -- saving and loading (the directory format: revffn_fx.serialization) ---------------
    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write a model directory that :meth:`from_pretrained` / ``rf.load`` reads back
        bit for bit (``max_shard_size="2GB"``); see :func:`revffn_fx.export.save`. On a
        sharded (FSDP2) model call it on every rank: the weights are gathered to rank 0,
        which writes (:func:`revffn_fx.distributed.save_pretrained`)."""
        if has_dtensors(self):  # FSDP2: gathered to rank 0, which writes
            return save_sharded(self, save_directory, **kwargs)
        save(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Load a directory written by :meth:`save_pretrained` or ``revffn-transform`` (as
        :func:`revffn_fx.export.load`, building this class)."""
        return rebuild(cls, directory, **kwargs)
