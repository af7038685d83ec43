"""Load a local Hugging Face causal-LM directory, offline, with one-line errors.

Every problem a user can fix (a wrong path, a broken config, missing or damaged weights,
weights for another config) raises :class:`revffn_fx.errors.LoadError` naming the file.
The hub is never contacted: ``local_files_only=True`` is always passed.

The checks :func:`load_model` runs live beside it, one module each:
:mod:`.config_checks` (config.json), :mod:`.size_bounds` (the config's sizes),
:mod:`.model_files` (the safetensors files, no path leading outside the directory),
:mod:`.weights_fit` (the checkpoint's tensors against the architecture, on the meta
device); :mod:`.parameter_count` counts a config's parameters, :mod:`.quiet` silences
transformers while loading.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from revffn_fx.errors import LoadError
from revffn_fx.frontend.config_checks import check_config
from revffn_fx.frontend.model_files import (
    check_weights,
    checkpoint_shapes,
    index_shards,
    inside,
    read_header,
)
from revffn_fx.frontend.parameter_count import count_parameters
from revffn_fx.frontend.quiet import quiet
from revffn_fx.frontend.registry import facts_for
from revffn_fx.frontend.size_bounds import check_config_bounds
from revffn_fx.frontend.weights_fit import check_fits, check_fits_meta

# the checks are imported from here by the export and the tools (one place to load from)
__all__ = ["check_config", "check_config_bounds", "check_fits", "check_weights",
           "count_parameters", "index_shards", "inside", "load_config", "load_model",
           "quiet", "read_header", "refuse_export"]


def load_model(model_dir: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
               **kwargs: Any) -> PreTrainedModel:
    """Load the causal LM saved in the local directory ``model_dir`` (eval mode).

    ``dtype`` is passed to ``from_pretrained`` when given (default: the checkpoint's own);
    other keyword arguments are passed through, after the architecture's registry
    ``load_kwargs``. Raises :class:`LoadError` for anything wrong with the directory.
    """
    path = Path(model_dir).expanduser()
    config_path, model_type = check_config(path)
    if "config" not in kwargs:  # rf.load passes the export's original config itself
        refuse_export(config_path)
    weights = check_weights(path)
    options: dict[str, Any] = {**facts_for(model_type).load_kwargs, **kwargs}
    if dtype is not None:
        options["dtype"] = dtype
    shapes = checkpoint_shapes(path, weights)
    raw = json.loads(config_path.read_text())
    check_config_bounds(config_path, raw, shapes, weights)
    if _loads_float64(raw, options.get("dtype"), shapes):
        # transformers' default grouped_mm experts have no float64 kernel on the CPU
        options.setdefault("experts_implementation", "eager")
    check_fits_meta(options.get("config") or load_config(path), shapes, weights, options)
    options.update(local_files_only=True, trust_remote_code=False, use_safetensors=True,
                   ignore_mismatched_sizes=True, output_loading_info=True)
    try:
        with quiet():
            model, info = AutoModelForCausalLM.from_pretrained(path, **options)
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{weights}: cannot load the model: {detail}") from e
    if info["mismatched_keys"]:
        name, ckpt_shape, model_shape = sorted(info["mismatched_keys"])[0]
        raise LoadError(f"{weights}: weights do not fit {config_path.name}: tensor {name} has "
                        f"shape {list(ckpt_shape)} in the checkpoint but {list(model_shape)} "
                        "in the model")
    if info["missing_keys"]:
        names = sorted(info["missing_keys"])
        raise LoadError(f"{weights}: weights do not fit {config_path.name}: {len(names)} tensor(s) "
                        f"missing from the checkpoint, e.g. {names[0]}")
    if info["unexpected_keys"]:
        names = sorted(info["unexpected_keys"])
        raise LoadError(f"{weights}: weights do not fit {config_path.name}: {len(names)} "
                        f"tensor(s) the model does not have, e.g. {names[0]}")
    return model.eval()


def refuse_export(config_path: Path) -> None:
    """A revffn-fx export of a function-changing coupling (config.json's model_type
    "revffn") is not a model directory to load or transform as a plain model: say what to
    do instead of transformers' "custom code" message."""
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") != "revffn":
        return
    coupling = (raw.get("revffn") or {}).get("coupling", "?")
    raise LoadError(f"{config_path.parent}: a revffn-fx export (the {coupling} coupling), not "
                    "an original model: load it with rf.load (or revffn verify); to transform, "
                    "start from the original model directory")


def load_config(model_dir: str | os.PathLike[str]) -> Any:
    """The config of a local model directory, without touching its weights."""
    config_path, model_type = check_config(Path(model_dir))
    raw = json.loads(config_path.read_text())
    raw = {k: v for k, v in raw.items() if k not in ("revffn", "auto_map")}
    raw["model_type"] = model_type  # an export's own "revffn": the original architecture's
    try:
        with quiet():
            return CONFIG_MAPPING[model_type].from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{config_path}: invalid config: {e}") from e


def _loads_float64(raw: Mapping[str, Any], dtype: Any,
                   shapes: Mapping[str, tuple[str, list[int]]]) -> bool:
    """Whether the load makes a float64 model (asked for, the config's, or the weights')."""
    if dtype is not None and dtype != "auto":
        return dtype in (torch.float64, "float64")
    named = raw.get("dtype", raw.get("torch_dtype"))
    if named not in (None, "auto"):
        return named == "float64"
    return any(d == "F64" for d, _ in shapes.values())
