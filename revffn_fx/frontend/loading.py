"""Load a local Hugging Face causal-LM directory, offline, with one-line errors.

Every problem a user can fix (a wrong path, a broken config, missing or damaged weights,
weights for another config) raises :class:`revffn_fx.errors.LoadError` naming the file.
The hub is never contacted: ``local_files_only=True`` is always passed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging as hf_logging

from revffn_fx.errors import LoadError
from revffn_fx.frontend.registry import SUPPORTED_TRANSFORMERS, facts_for
from revffn_fx.output import check_model_dir

# The weight files read, in from_pretrained's order of preference. Pickled checkpoints
# (pytorch_model.bin) are refused everywhere: unpickling runs code.
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
_PICKLED = ("pytorch_model.bin.index.json", "pytorch_model.bin")
# config.json fields that must be positive integers / numbers when present
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "intermediate_size", "moe_intermediate_size",
                  "vocab_size", "num_local_experts", "num_experts", "n_routed_experts",
                  "num_experts_per_tok", "head_dim", "max_position_embeddings")
_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "initializer_range",
            "router_aux_loss_coef")
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "auto")
_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
              "granitemoe", "phimoe", "dbrx", "jetmoe", "minimax", "flex_olmo")
_VERSIONS = f"transformers {transformers.__version__}; revffn-fx supports " + ",".join(
    SUPPORTED_TRANSFORMERS)


def load_model(model_dir: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
               **kwargs: Any) -> PreTrainedModel:
    """Load the causal LM saved in the local directory ``model_dir`` (eval mode).

    ``dtype`` is passed to ``from_pretrained`` when given (default: the checkpoint's own);
    other keyword arguments are passed through, after the architecture's registry
    ``load_kwargs``. Raises :class:`LoadError` for anything wrong with the directory.
    """
    path = Path(model_dir).expanduser()
    config_path, model_type = check_config(path)
    weights = check_weights(path)
    options: dict[str, Any] = {**facts_for(model_type).load_kwargs, **kwargs}
    if dtype is not None:
        options["dtype"] = dtype
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


def load_config(model_dir: str | os.PathLike[str]) -> Any:
    """The config of a local model directory, without touching its weights."""
    config_path, model_type = check_config(Path(model_dir))
    raw = json.loads(config_path.read_text())
    try:
        with quiet():
            return CONFIG_MAPPING[model_type].from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{config_path}: invalid config: {e}") from e


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
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        known = ", ".join(t for t in _MOE_TYPES if t in CONFIG_MAPPING)
        raise LoadError(f"{config_path}: unknown model_type {model_type!r} ({_VERSIONS}; "
                        f"known MoE types include {known})")
    _check_fields(config_path, config)
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
    experts = next((config[key] for key in _EXPERT_COUNTS if isinstance(config.get(key), int)),
                   None)
    if isinstance(k, int) and experts is not None and k > experts:
        raise LoadError(f"{config_path}: num_experts_per_tok {k} is larger than the number of "
                        f"experts ({experts})")


def inside(file: Path, model_dir: Path) -> Path:
    """``file`` resolved, if it stays inside ``model_dir``; else a LoadError naming it.

    A symlink to another file of ``model_dir`` is fine; so is a Hugging Face hub cache
    snapshot (``.../snapshots/<rev>/x`` linking to ``.../blobs/<hash>`` of the same repo).
    """
    root = model_dir.resolve()
    target = file.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":
        allowed.append(root.parent.parent / "blobs")
    if not any(target == a or a in target.parents for a in allowed):
        raise LoadError(f"{file}: leads outside the model directory (to {target}); revffn-fx "
                        "reads only files inside MODEL_DIR")
    if target.exists() and not target.is_file():
        raise LoadError(f"{file}: not a regular file")
    return target


def check_weights(path: Path) -> Path:
    """The main weights file; every safetensors file it names has a readable header."""
    found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if found is None:
        pickled = next((path / f for f in _PICKLED if (path / f).exists()), None)
        if pickled is not None:
            raise LoadError(f"{pickled}: only safetensors checkpoints are read (revffn-fx never "
                            "unpickles .bin files); convert it to model.safetensors first")
        raise LoadError(f"{path}: no weights (expected one of {', '.join(WEIGHT_FILES)}; "
                        f"{_PICKLED[1]} is not read)")
    inside(found, path)
    shards = [found]
    if found.name.endswith(".index.json"):
        shards = [path / s for s in index_shards(found)]
        for shard in shards:
            if not os.path.lexists(shard):
                raise LoadError(f"{found}: lists shard {shard.name}, which is missing")
            inside(shard, path)
            if not shard.is_file():
                raise LoadError(f"{found}: lists shard {shard.name}, which is missing")
    for shard in shards:
        _check_safetensors(shard)
    return found


def index_shards(index: Path) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json``, checked."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError, RecursionError) as e:
        raise LoadError(f"{index}: not a valid weights index ({type(e).__name__})") from None
    if (not isinstance(weight_map, dict) or not weight_map
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise LoadError(f"{index}: not a valid weights index: 'weight_map' must map tensor "
                        "names to shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise LoadError(f"{index}: shard name {name!r} is not a file name in the model "
                            "directory")
        if not name.endswith(".safetensors"):
            raise LoadError(f"{index}: shard {name!r} is not a .safetensors file")
    return names


def _check_safetensors(file: Path) -> None:
    """Read the header of ``file``; tensors stacked into one (experts) must agree in shape."""
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError
        raise LoadError(f"{file}: truncated or corrupted safetensors file ({e})") from e
    first: dict[str, tuple[str, list[int]]] = {}
    for name, shape in shapes.items():
        group = re.sub(r"\.experts\.\d+\.", ".experts.*.", name)
        if group == name:
            continue
        other, other_shape = first.setdefault(group, (name, shape))
        if shape != other_shape:
            raise LoadError(f"{file}: weights do not fit each other: tensor {name} has shape "
                            f"{shape} but {other} has {other_shape}")


@contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' load report and progress bar; we raise our own errors."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
