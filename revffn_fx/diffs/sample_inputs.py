"""A small model input, and each decoder layer's inputs captured while running it: what the
diffs run through both graphs to label nodes with tensor shapes."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def sample_inputs(rev: Any, seq: int = 8
                  ) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """A small model input and, captured while running it, each layer's inputs by name."""
    vocab = int(getattr(rev.config, "vocab_size", 0) or 32)
    ids = (torch.arange(seq) % vocab).unsqueeze(0)
    model_in = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    layer_in: dict[int, dict[str, Any]] = {}
    hooks = []
    for lg in rev.traced.layers:
        sig = inspect.signature(lg.module.forward)

        def grab(_m: Any, args: Any, kwargs: Any, _i: int = lg.index, _s: Any = sig) -> None:
            layer_in.setdefault(_i, dict(_s.bind_partial(*args, **kwargs).arguments))

        hooks.append(lg.module.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            rev.traced.graph_module(**model_in)
    except Exception:  # shapes are optional; the diff itself does not need them
        pass
    finally:
        for h in hooks:
            h.remove()
    return model_in, layer_in
