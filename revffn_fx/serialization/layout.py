"""The OUT_DIR layout: file names, the config ``revffn`` section (:func:`revffn_section`),
the loader shim and model card (:func:`write_meta`), shard-size parsing (:func:`parse_size`),
and two helpers of the summary (:func:`count_params`, :func:`layer_span`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__, couplings
from ..errors import ExportError
from ..options import TransformOptions

FORMAT_VERSION = 1
ADAPTER_FILE = "revffn_adapters.safetensors"
SHIM_FILE = "modeling_revffn.py"
SHIM_CLASS = "RevFFNForCausalLM"
SHIM_CONFIG = "RevFFNConfig"
# config.json's model_type for an export whose function is not the original architecture's
# (every coupling but the exact mode): a plain from_pretrained must not load its weights
# into the original class and compute another function; the original model_type moves to
# the revffn section ("model_type")
EXPORT_MODEL_TYPE = "revffn"
# couplings whose export is the original architecture (the registry says which)
FUNCTION_PRESERVING = tuple(n for n, c in couplings.REGISTRY.items() if c.preserves_function)
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files carried over from MODEL_DIR besides the weights: tokenizer and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")
EXTRA_FILES = ("generation_config.json",)

_SHIM = f'''"""Loader for a revffn-fx model directory (written by revffn-fx; holds no model code).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(this_dir, trust_remote_code=True)

needs revffn-fx installed (pip install revffn-fx): it rebuilds the reversible model from
config.json's "revffn" section and loads the safetensors weights (``revffn_fx.load``).
"""

from revffn_fx.export import {SHIM_CLASS}, {SHIM_CONFIG}

__all__ = ["{SHIM_CLASS}", "{SHIM_CONFIG}"]
'''

def parse_size(size: int | str) -> int:
    """``"2GB"`` (10^9), ``"500MiB"`` (2^20), or a byte count -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            value = convert_file_size_to_int(size.strip())
        except (ValueError, AttributeError):
            raise ExportError(f"bad shard size {size!r}: use e.g. 500MB or 2GB") from None
    if value <= 0:
        raise ExportError(f"bad shard size {size!r}: must be positive")
    return value

# ------------------------------------------------------------------------- config and metadata

def _versions() -> dict[str, str]:
    import transformers

    return {"revffn_fx": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__}


def revffn_section(rev: Any, adapter_shapes: dict[str, list[int]], dtype: torch.dtype,
                   params_before: int) -> dict[str, Any]:
    """The ``revffn`` config section: everything :func:`load` needs to replay the transform."""
    custom = [(getattr(p, "__name__", type(p).__name__), getattr(p, "scope", "layer"))
              for p in rev.user_passes]
    options = recorded_options(rev)
    checkpoint_rest, loss_head = options.checkpoint_rest, options.loss_head
    return {
        "format_version": FORMAT_VERSION,
        "coupling": rev.coupling,
        "layers": list(rev.converted),
        "num_layers": len(rev.plan.layers),
        "hidden_size": rev.hidden_size,
        "transform": options.to_dict(),  # every option: load replays them all
        "passes": [
            {"name": "analyze", "scope": "model"},
            {"name": "couple", "scope": "layer", "options": {"coupling": rev.coupling}},
            *({"name": n, "scope": scope, "custom": True} for n, scope in custom),
            {"name": "inverse", "scope": "layer"},
            {"name": "fuse", "scope": "model", "options": {"checkpoint_rest": checkpoint_rest}},
            *([{"name": "loss_head", "scope": "model", "options": {"loss_head": loss_head}}]
              if loss_head is not None else []),
        ],
        "adapters": ({"file": ADAPTER_FILE, "dtype": str(dtype).replace("torch.", ""),
                      "shapes": adapter_shapes} if adapter_shapes else None),
        "parameters": {"original": params_before,
                       "added": sum(_numel(s) for s in adapter_shapes.values())},
        "versions": _versions(),
    }


def recorded_options(rev: Any) -> TransformOptions:
    """The options that rebuild ``rev`` from its base model: the layers it converted, its
    stream dtype, and with cross-branch attention the fixed point's iterations and
    tolerance as resolved for its dtype."""
    given: TransformOptions = rev.transform_options
    stream_dtype = getattr(rev.options, "stream_dtype", None)
    cross = given.attention == "cross"
    return given.replace(
        layers=list(rev.converted), checkpoint_rest=bool(getattr(rev, "checkpoint_rest", False)),
        stream_dtype=None if stream_dtype is None else str(stream_dtype),
        fixed_point_iters=rev.options.fixed_point_iters if cross else given.fixed_point_iters,
        fixed_point_tol=rev.options.fixed_point_tol if cross else given.fixed_point_tol)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def count_params(model: torch.nn.Module) -> int:
    """The model's parameter count, tied weights once."""
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def layer_span(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _model_card(config: dict[str, Any], section: dict[str, Any]) -> str:
    p = section["parameters"]
    layers = section["layers"]
    v = section["versions"]
    pct = 100 * p["added"] / max(p["original"], 1)
    added = (f"{p['added']:,} adapter parameters added ({pct:.2f}% of {p['original']:,})"
             if p["added"] else "no parameters added")
    return f"""---
library_name: transformers
tags:
- revffn-fx
- reversible
- mixture-of-experts
---

# {config.get("model_type", "model")} with reversible decoder layers (revffn-fx)

This directory was written by revffn-fx {v['revffn_fx']} (torch {v['torch']}, transformers
{v['transformers']}). Decoder layers {layer_span(layers)} of {section['num_layers']} were
rewritten into **{section['coupling']}** reversible couplings: their attention and MoE
sublayers are the two halves of a coupling, so backward recomputes activations from the
layer outputs instead of storing them. The pretrained weights are unchanged; {added}.

```python
import revffn_fx as rf
model = rf.load("this_dir")   # or AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
```

Fine-tune it like any causal LM (`model(input_ids, labels=labels).loss.backward()`) and save
with `model.save_pretrained(dir)`. `config.json`'s `revffn` section records what was done.
"""


def base_model_type(config: dict[str, Any]) -> Any:
    """The original architecture's model_type of a config.json (an export's own
    :data:`EXPORT_MODEL_TYPE` resolved through its revffn section)."""
    if config.get("model_type") == EXPORT_MODEL_TYPE and isinstance(config.get("revffn"), dict):
        return config["revffn"].get("model_type")
    return config.get("model_type")


def write_meta(out: Path, config: dict[str, Any], section: dict[str, Any]) -> list[str]:
    """config.json (with ``revffn`` and ``auto_map``), the loader shim and the model card."""
    config = {k: v for k, v in config.items() if k not in ("revffn", "auto_map")}
    config["revffn"] = section
    config["auto_map"] = {"AutoModelForCausalLM": f"{SHIM_FILE[:-3]}.{SHIM_CLASS}"}
    if section["coupling"] not in FUNCTION_PRESERVING:  # never passes for the plain class
        section["model_type"] = base_model_type(config)
        config["model_type"] = EXPORT_MODEL_TYPE
        config["architectures"] = [SHIM_CLASS]
        config["auto_map"]["AutoConfig"] = f"{SHIM_FILE[:-3]}.{SHIM_CONFIG}"
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / SHIM_FILE).write_text(_SHIM)
    (out / "README.md").write_text(_model_card(config, section))
    return ["config.json", SHIM_FILE, "README.md"]
