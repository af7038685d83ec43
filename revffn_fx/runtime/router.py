"""Capture router logits from router modules with forward hooks.

transformers collects router logits with hooks on the router modules and computes the
load-balancing loss from them; inside a traced graph those hooks would record nothing
useful, so revffn-fx installs its own and hands the logits to the reversible stacks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class RouterTap:
    """Records ``output[index]`` of every router module call while active."""

    def __init__(self, routers: list[nn.Module], index: int = 0) -> None:
        self.index = index
        self.records: list[torch.Tensor] = []
        self.active = False
        self._handles = [m.register_forward_hook(self._hook) for m in routers]
        self.count = len(routers)

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active:
            out = output[self.index] if isinstance(output, (tuple, list)) else output
            self.records.append(out)

    @contextmanager
    def recording(self, on: bool = True) -> Iterator[list[torch.Tensor]]:
        """Record into a fresh list for the duration of the body."""
        saved, was = self.records, self.active
        self.records, self.active = [], on
        try:
            yield self.records
        finally:
            self.records, self.active = saved, was

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def find_routers(model: nn.Module) -> tuple[list[nn.Module], int]:
    """Router modules of a transformers model, read off its output recorder spec.

    transformers declares ``_can_record_outputs["router_logits"]`` as the router class and
    the index of the logits in its output; that is the generic source of truth.
    """
    specs: list[Any] = []
    for m in model.modules():
        spec = getattr(m, "_can_record_outputs", None) or {}
        if "router_logits" in spec:
            specs.append(spec["router_logits"])
    for spec in specs:
        cls = getattr(spec, "target_class", spec)
        index = getattr(spec, "index", 0) or 0
        layer_name = getattr(spec, "layer_name", None)
        routers = [m for name, m in model.named_modules()
                   if isinstance(cls, type) and isinstance(m, cls)
                   and (layer_name is None or name.endswith(layer_name))]
        if routers:
            return routers, index
    return [], 0
