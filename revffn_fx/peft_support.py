"""PEFT (LoRA and the other tuners) on a RevModel.

``peft.get_peft_model(rev, LoraConfig(...))`` works on a RevModel: it exposes what PEFT
reads (``config``, ``base_model_prefix``, ``prepare_inputs_for_generation``,
``generation_config``), PEFT injects its layers into the wrapped transformers model, and
the reversible stacks run them like any other module (the generated backward is exact
with LoRA: ``tests/test_peft.py``). What this module adds:

- :func:`~revffn_fx.model_peft.refresh_modules`: PEFT replaces modules (``q_proj`` by a
  LoRA layer, and back on ``merge_and_unload``); graphs compiled before would keep calling
  the old ones where they call them directly (the LM head, the embeddings). The RevModel
  notices a changed module tree at its next forward and compiles again.
- the coupling's own adapters (revffn's ``adapters``) when the base is frozen: PEFT's
  ``get_peft_model`` freezes everything but its own layers, the adapters included; a
  RevModel built on a model that already has LoRA layers (or whose weights are all
  frozen) freezes them too, with a warning. To train them next to LoRA, say so:
  :func:`train_coupling_adapters` (their weights are then saved by ``rev.save_pretrained``,
  not by PEFT's adapter checkpoint).
"""

from __future__ import annotations

from typing import Any

from .errors import RevFFNError
from .model import RevModel


def find_rev(model: Any) -> RevModel:
    """The RevModel inside ``model`` (itself, or a PeftModel's)."""
    for m in model.modules():
        if isinstance(m, RevModel):
            return m
    raise RevFFNError(f"no RevModel inside {type(model).__name__}")


def train_coupling_adapters(model: Any, on: bool = True) -> list[str]:
    """Make the coupling's own adapters of the RevModel in ``model`` (a RevModel or a
    PeftModel around one) trainable (``on=False``: frozen). Returns their names."""
    rev = find_rev(model)
    rev.adapters.requires_grad_(on)
    return [f"adapters.{n}" for n, _ in rev.adapters.named_parameters()]
