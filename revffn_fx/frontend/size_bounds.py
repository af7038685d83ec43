"""A config's sizes, bounded before anything is built: the parameters it describes
(:func:`config_parameters`, at most :data:`MAX_PARAMETERS`), and with the checkpoint's
headers, decoder layers and experts the checkpoint actually holds."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from revffn_fx.errors import LoadError

#: config.json fields that count the experts of an MoE layer, in the order they are read
EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
# A config describing more parameters than this is refused before anything is built: ten
# times the largest open MoE models (about 1e12 parameters).
MAX_PARAMETERS = 10**13


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = config.get(k)
        if type(v) is int:
            return v
    return None


def config_parameters(config: Mapping[str, Any]) -> int:
    """An upper estimate of the parameters ``config`` describes, from its sizes alone."""
    hidden = _first_int(config, "hidden_size", "d_model", "n_embd") or 1
    layers = _first_int(config, "num_hidden_layers", "n_layers") or 1
    vocab = _first_int(config, "vocab_size") or 1
    dense = _first_int(config, "intermediate_size") or 4 * hidden
    moe = _first_int(config, "moe_intermediate_size") or dense
    experts = (_first_int(config, *EXPERT_COUNTS) or 0) + (
        _first_int(config, "n_shared_experts") or 1)
    heads = max(_first_int(config, "num_attention_heads", "n_heads") or 1, 1)
    head_dim = max(_first_int(config, "head_dim") or 0, hidden // heads)
    attention = 4 * hidden * max(heads * head_dim, hidden)
    return 2 * vocab * hidden + layers * (attention + 3 * hidden * (dense + moe * experts))


_LAYER = re.compile(r"^(.*?\.(?:layers|blocks|h|layer))\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def check_config_bounds(config_path: Path, config: Mapping[str, Any],
                        shapes: Mapping[str, tuple[str, list[int]]] | None = None,
                        weights: Path | None = None) -> None:
    """The config's sizes, before anything is built or allocated: an absurd model is
    refused at once (:data:`MAX_PARAMETERS`), and with the checkpoint's headers
    (``shapes``) the config's decoder layers and experts must be there, so that building
    the architecture (even on the meta device) stays in proportion to the checkpoint;
    :func:`check_fits` then compares every tensor."""
    n = config_parameters(config)
    if n > MAX_PARAMETERS:
        raise LoadError(f"{config_path}: describes about {n:.2g} parameters (its sizes: "
                        f"{_sizes(config)}), more than revffn-fx accepts ({MAX_PARAMETERS:.0e})")
    if not shapes:
        return
    where = f"{weights or config_path.parent}: weights do not fit {config_path.name}"
    layers = _first_int(config, "num_hidden_layers", "n_layers")
    found: dict[str, set[int]] = {}
    for name in shapes:
        if m := _LAYER.match(name):
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if layers is not None and found:
        prefix, idx = max(found.items(), key=lambda kv: len(kv[1]))
        if layers > len(idx):
            raise LoadError(f"{where}: num_hidden_layers is {layers} but the checkpoint holds "
                            f"{len(idx)} decoder layer(s) ({prefix}.<i>)")
    experts = _first_int(config, *EXPERT_COUNTS)
    if experts is not None and any(".experts." in k for k in shapes):
        per_expert = {int(m.group(1)) for k in shapes if (m := _EXPERT.search(k))}
        fused = [s[1][0] for k, s in shapes.items()
                 if ".experts." in k and not _EXPERT.search(k) and len(s[1]) == 3]
        held = max([len(per_expert), *fused])
        if held and experts > held:
            raise LoadError(f"{where}: the config has {experts} experts per layer but the "
                            f"checkpoint holds {held}")


def _sizes(config: Mapping[str, Any]) -> str:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "vocab_size", *EXPERT_COUNTS)
    return ", ".join(f"{k} {config[k]}" for k in keys if type(config.get(k)) is int)
