"""PEFT (LoRA and the other tuners) on a RevModel.

``peft.get_peft_model(rev, LoraConfig(...))`` works on a RevModel: it exposes what PEFT
reads (``config``, ``base_model_prefix``, ``prepare_inputs_for_generation``,
``generation_config``), PEFT injects its layers into the wrapped transformers model, and
the reversible stacks run them like any other module (the generated backward is exact
with LoRA: ``tests/test_peft.py``). What this module adds:

- :func:`refresh_modules`: PEFT replaces modules (``q_proj`` by a LoRA layer, and back on
  ``merge_and_unload``); graphs compiled before would keep calling the old ones where they
  call them directly (the LM head, the embeddings). The RevModel notices a changed module
  tree at its next forward and compiles again.
- the coupling's own adapters (revffn's ``adapters``) when the base is frozen: PEFT's
  ``get_peft_model`` freezes everything but its own layers, the adapters included; a
  RevModel built on a model that already has LoRA layers (or whose weights are all
  frozen) freezes them too, with a warning. To train them next to LoRA, say so:
  :func:`train_coupling_adapters` (their weights are then saved by ``rev.save_pretrained``,
  not by PEFT's adapter checkpoint).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .errors import RevFFNError


def _tree_key(model: nn.Module) -> tuple[int, ...]:
    return tuple(id(m) for m in model.modules())


def refresh_modules(rev: Any) -> bool:
    """Forget compiled graphs and traces if modules of ``rev.model`` were replaced since
    they were built (PEFT injecting or unloading its layers). Returns whether it did."""
    key = _tree_key(rev.model)
    old = rev.__dict__.get("_module_tree")
    rev.__dict__["_module_tree"] = key
    if old is None or old == key:
        return False
    from .runtime.router import RouterTap, find_routers

    rev.compiled.clear()
    traced = rev.traced
    for lg in traced.layers:
        lg._graphs.clear()
    traced._graphs.clear()
    routers, index = find_routers(rev.model)
    rev.options.router_tap = RouterTap(routers, index) if routers else None
    return True


def has_peft_layers(model: nn.Module) -> bool:
    """Whether PEFT tuner layers (LoRA, ...) are injected in ``model``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def follow_frozen_base(rev: Any) -> None:
    """At transform: freeze the coupling's adapters when the base model carries PEFT layers
    or has no trainable weight (the user fine-tunes adapters of their own, not the base)."""
    if not len(rev.adapters):
        return
    params = list(rev.model.parameters())
    frozen = has_peft_layers(rev.model) or not any(p.requires_grad for p in params)
    if not frozen:
        return
    rev.adapters.requires_grad_(False)
    warnings.warn("the base model is frozen (PEFT layers or no trainable weight): the "
                  f"{rev.coupling} coupling's adapters are frozen too; to train them, call "
                  "revffn_fx.peft_support.train_coupling_adapters(model)", stacklevel=3)


def find_rev(model: Any) -> Any:
    """The RevModel inside ``model`` (itself, or a PeftModel's)."""
    from .model import RevModel

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


def refuse_peft_wrapper(model: Any) -> None:
    """``rf.transform(peft_model)``: say which model to transform."""
    if type(model).__name__.startswith("PeftModel") and hasattr(model, "base_model"):
        raise RevFFNError(
            "transform the transformers model inside the PeftModel "
            "(rf.transform(peft_model.base_model.model)), or transform first and apply PEFT "
            "to the RevModel: peft.get_peft_model(rev, LoraConfig(...))")
