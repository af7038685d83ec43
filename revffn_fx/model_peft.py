"""What a RevModel does about PEFT (:mod:`revffn_fx.peft_support` tells the whole story):
compile again when PEFT replaced modules (:func:`refresh_modules`), freeze the coupling's
adapters on a frozen base (:func:`follow_frozen_base`), refuse a PeftModel given to
``transform`` (:func:`refuse_peft_wrapper`)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .errors import RevFFNError
from .runtime.router import RouterTap, find_routers


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


def refuse_peft_wrapper(model: Any) -> None:
    """``rf.transform(peft_model)``: say which model to transform."""
    if type(model).__name__.startswith("PeftModel") and hasattr(model, "base_model"):
        raise RevFFNError(
            "transform the transformers model inside the PeftModel "
            "(rf.transform(peft_model.base_model.model)), or transform first and apply PEFT "
            "to the RevModel: peft.get_peft_model(rev, LoraConfig(...))")
