"""Whether a checkpoint's tensors fit the architecture its config describes, checked on
the meta device from the safetensors headers alone: nothing is allocated or read."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from revffn_fx.errors import LoadError
from revffn_fx.frontend.quiet import quiet

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def check_fits(model: torch.nn.Module, shapes: Mapping[str, tuple[str, list[int]]],
               weights: Path, dtype: torch.dtype) -> None:
    """Load the checkpoint's names and shapes into the meta model with HF's own rules.

    Hugging Face's loader (renamings, expert merging, legacy names) runs on meta tensors
    built from the safetensors headers: it reports missing, unexpected and mismatched
    tensors exactly as a real load would, without reading any data.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:  # pragma: no cover - a transformers outside the supported range
        return
    state = {name: torch.empty(shape, dtype=_DTYPES.get(code, dtype), device="meta")
             for name, (code, shape) in shapes.items()}
    load_config = LoadStateDictConfig(device_map={"": "meta"}, dtype=dtype,
                                      weight_mapping=get_model_conversion_mapping(model))
    with quiet():
        info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
        adjust = getattr(model, "_adjust_missing_and_unexpected_keys", None)
        if adjust is not None:
            adjust(info)
    where = f"{weights}: weights do not fit config.json"
    if info.conversion_errors:
        name, err = sorted(info.conversion_errors.items())[0]
        detail = next((ln for ln in reversed(str(err).splitlines()) if ln.strip()), "")
        raise LoadError(f"{where}: cannot build tensor {name}: {detail.strip()}")
    if info.mismatched_keys:
        name, ckpt, want = sorted(info.mismatched_keys, key=lambda m: m[0])[0]
        raise LoadError(f"{where}: tensor {name} has shape {list(ckpt)} in the checkpoint but "
                        f"{list(want)} in the model")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()  # loading replaced the tied tensors; tie again, as a real load does
    missing = sorted(set(info.missing_keys) - tied)
    if missing:
        raise LoadError(f"{where}: {len(missing)} tensor(s) missing from the checkpoint, "
                        f"e.g. {missing[0]}")
    if info.unexpected_keys:
        names = sorted(info.unexpected_keys)
        raise LoadError(f"{where}: {len(names)} tensor(s) the model does not have, "
                        f"e.g. {names[0]}")


def check_fits_meta(config: Any, shapes: Mapping[str, tuple[str, list[int]]], weights: Path,
                     options: Mapping[str, Any]) -> None:
    """:func:`check_fits` on the architecture built on the meta device (nothing allocated),
    so a config that does not describe the checkpoint is refused before ``from_pretrained``
    allocates the model at the config's shapes."""
    kwargs = {k: v for k, v in options.items()
              if k in ("attn_implementation", "experts_implementation")}
    try:
        with quiet(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except Exception:  # noqa: BLE001 -- the real load reports it in its own words
        return
    check_fits(model, shapes, weights, next(model.parameters()).dtype)
