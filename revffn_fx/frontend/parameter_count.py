"""The parameters of the model a config describes, counted on the meta device with one
decoder layer of each kind rather than all of them."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from revffn_fx.frontend.quiet import quiet


def _layer_kinds(config: Any, n: int) -> list[tuple[Any, ...]]:
    """What can make decoder layer ``i`` differ from another, per layer: a dense prefix
    (``first_k_dense_replace``), listed dense layers (``mlp_only_layers``), a sparse step
    (``decoder_sparse_step``, ``moe_layer_freq``, ``interleave_moe_layer_step``) and every
    per-layer list of the config (``layer_types``, ...)."""
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    first_dense = int(fields.get("first_k_dense_replace") or 0)
    dense_list = set(fields.get("mlp_only_layers") or [])
    steps = [int(fields.get(k) or 1) for k in ("decoder_sparse_step", "moe_layer_freq",
                                                "interleave_moe_layer_step")
             if isinstance(fields.get(k), int)]
    per_layer = [v for v in fields.values() if isinstance(v, list) and len(v) == n]
    return [(i < first_dense, i in dense_list, *((i + 1) % s for s in steps),
             *(json.dumps(v[i], sort_keys=True, default=str) for v in per_layer))
            for i in range(n)]


def count_parameters(config: Any, build: Any = None) -> tuple[int, int]:
    """(parameters, numel of the largest one) of the model ``config`` describes, tied
    weights once, built on the meta device with one decoder layer of each kind
    (:func:`_layer_kinds`) rather than all of them: the work grows with the number of
    distinct kinds, not of layers. ``build(config)`` makes the model (default:
    ``AutoModelForCausalLM.from_config``)."""

    def make(cfg: Any) -> torch.nn.Module:
        with quiet(), torch.device("meta"):
            return build(cfg) if build is not None else AutoModelForCausalLM.from_config(cfg)

    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    kinds = _layer_kinds(config, n)
    first: dict[tuple[Any, ...], int] = {}
    for i, k in enumerate(kinds):
        first.setdefault(k, i)
    m = max(first.values(), default=0) + 1
    if m >= n:
        model = make(config)
        sizes = [p.numel() for p in model.parameters()]
        return sum(sizes), max(sizes)
    small = copy.deepcopy(config)
    small.num_hidden_layers = m
    for key, value in list(vars(small).items()):
        if isinstance(value, list) and len(value) == n:
            setattr(small, key, value[:m])
    model = make(small)
    stacks = [mod for mod in model.modules()
              if isinstance(mod, torch.nn.ModuleList) and len(mod) == m]
    if not stacks:  # no decoder-layer list found: build it whole
        model = make(config)
        sizes = [p.numel() for p in model.parameters()]
        return sum(sizes), max(sizes)
    layers = stacks[0]
    sizes = [p.numel() for p in model.parameters()]
    in_layers = {id(p) for p in layers.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = rest + sum(per_layer[first[k]] for k in kinds)
    return total, max(sizes)
