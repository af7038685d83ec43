"""The checks of a model directory's config.json: readable, a JSON object, a
``model_type`` transformers knows, the common fields of the right types and ranges, sizes
in bounds (:mod:`.size_bounds`), and transformers' own validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from revffn_fx.errors import LoadError
from revffn_fx.frontend.model_files import inside
from revffn_fx.frontend.quiet import quiet
from revffn_fx.frontend.registry import SUPPORTED_TRANSFORMERS
from revffn_fx.frontend.size_bounds import EXPERT_COUNTS, check_config_bounds
from revffn_fx.output import check_model_dir

# config.json fields that must be positive integers / numbers when present
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                  "vocab_size", "num_local_experts", "num_experts", "n_routed_experts",
                  "num_experts_per_tok", "head_dim", "max_position_embeddings")
_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range",
            "router_aux_loss_coef")
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "auto")
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
              "granitemoe", "phimoe", "dbrx", "jetmoe", "minimax", "flex_olmo")
_VERSIONS = f"transformers {transformers.__version__}; revffn-fx supports " + ",".join(
    SUPPORTED_TRANSFORMERS)


def check_config(path: Path) -> tuple[Path, str]:
    """The path of a readable config.json, and its ``model_type`` (known to transformers).

    Also checks the config's shape (types and ranges of the common fields) and that the
    files Hugging Face reads beside it do not lead outside ``path``.
    """
    check_model_dir(str(path))  # exists, is a directory, holds a config.json
    config_path = path / "config.json"
    inside(config_path, path)
    if (path / "generation_config.json").exists():
        inside(path / "generation_config.json", path)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{config_path}: not valid JSON: line {e.lineno} column {e.colno}: "
                        f"{e.msg}") from e
    except RecursionError:
        raise LoadError(f"{config_path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{config_path}: cannot read: {e}") from e
    if not isinstance(config, dict):
        raise LoadError(f"{config_path}: not a JSON object (got a {type(config).__name__})")
    model_type = config.get("model_type")
    if model_type == "revffn":  # a function-changing coupling's export (serialization/layout.py)
        section = config.get("revffn")
        if not isinstance(section, dict):
            raise LoadError(f"{config_path}: model_type 'revffn' but the 'revffn' section is "
                            "not an object")
        model_type = section.get("model_type")  # the original architecture's
        if not isinstance(model_type, str):
            raise LoadError(f"{config_path}: model_type 'revffn' but the 'revffn' section is "
                            "broken: it names no original model_type")
        config = {**config, "model_type": model_type}
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        known = ", ".join(t for t in _MOE_TYPES if t in CONFIG_MAPPING)
        raise LoadError(f"{config_path}: unknown model_type {model_type!r} ({_VERSIONS}; "
                        f"known MoE types include {known})")
    _check_fields(config_path, config)
    check_config_bounds(config_path, config)
    try:  # transformers' own validation of every field (types, rope parameters, ...)
        with quiet():
            CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as e:  # noqa: BLE001 -- it raises several types, all for a bad config
        detail = " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
        raise LoadError(f"{config_path}: invalid config: {detail[:300] or type(e).__name__}"
                        ) from None
    return config_path, model_type


def _check_fields(config_path: Path, config: dict[str, Any]) -> None:
    """Types and ranges of the fields every architecture reads, and the expert top-k."""
    for key in _POSITIVE_INTS:
        v = config.get(key)
        if v is not None and (type(v) is not int or v <= 0):
            raise LoadError(f"{config_path}: {key} must be a positive integer, not {v!r}")
    for key in _NUMBERS:
        v = config.get(key)
        if v is not None and (type(v) not in (int, float) or v != v):
            raise LoadError(f"{config_path}: {key} must be a number, not {v!r}")
    for key in ("dtype", "torch_dtype"):
        v = config.get(key)
        if v is not None and v not in _DTYPE_NAMES:
            raise LoadError(f"{config_path}: {key} {v!r} is not a dtype revffn-fx knows "
                            f"({', '.join(_DTYPE_NAMES)})")
    k = config.get("num_experts_per_tok")
    experts = next((config[key] for key in EXPERT_COUNTS if isinstance(config.get(key), int)),
                   None)
    if isinstance(k, int) and experts is not None and k > experts:
        raise LoadError(f"{config_path}: num_experts_per_tok {k} is larger than the number of "
                        f"experts ({experts})")
