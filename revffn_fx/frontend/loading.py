"""Load a local Hugging Face causal-LM directory, offline, with one-line errors.

Every problem a user can fix (a wrong path, a broken config, missing or damaged weights,
weights for another config) raises :class:`revffn_fx.errors.LoadError` naming the file.
The hub is never contacted: ``local_files_only=True`` is always passed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Iterator, Mapping
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

# The weight files read, in from_pretrained's order of preference (model.safetensors first:
# where both exist they must hold the same tensors). Pickled checkpoints
# (pytorch_model.bin) are refused everywhere: unpickling runs code.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
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
# A config describing more parameters than this is refused before anything is built: ten
# times the largest open MoE models (about 1e12 parameters).
MAX_PARAMETERS = 10**13
_CHUNK = 16 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
log = logging.getLogger("revffn_fx.load")
_noted: set[tuple[str, int, int]] = set()


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
    _check_fits_meta(options.get("config") or load_config(path), shapes, weights, options)
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
    if model_type == "revffn":  # an export of a function-changing coupling (export/layout.py)
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
    shards = weight_files(path, found)
    for shard in shards:
        _check_safetensors(shard)
    index = path / WEIGHT_FILES[1]
    if found.name == WEIGHT_FILES[0] and os.path.lexists(index):
        inside(index, path)
        _check_same_weights(found, index, weight_files(path, index))
    return found


def weight_files(path: Path, weights: Path) -> list[Path]:
    """The safetensors files holding the tensors of ``weights`` (itself or its shards)."""
    if not weights.name.endswith(".index.json"):
        return [weights]
    shards = [path / s for s in index_shards(weights)]
    for shard in shards:
        if not os.path.lexists(shard):
            raise LoadError(f"{weights}: lists shard {shard.name}, which is missing")
        inside(shard, path)
        if not shard.is_file():
            raise LoadError(f"{weights}: lists shard {shard.name}, which is missing")
    return shards


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(os.fstat(f.fileno()).st_size - 8, 100 << 20):  # never trust n blindly
                raise ValueError(f"header size {n} does not fit the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError, RecursionError) as e:
        raise LoadError(f"{file}: truncated or corrupted safetensors file ({e})") from e
    return header, 8 + n


def _tensors(files: list[Path]) -> dict[str, tuple[str, list[int], Path, int, int]]:
    """name -> (dtype, shape, file, offset, nbytes) over ``files``' headers."""
    out = {}
    for file in files:
        header, start = read_header(file)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], list(info["shape"]), file, start + b, e - b)
    return out


def _check_same_weights(single: Path, index: Path, shards: list[Path]) -> None:
    """model.safetensors beside an index: Hugging Face reads model.safetensors, so the two
    must hold the same tensors (names, dtypes, shapes and bytes) or the load is refused."""
    if [s.resolve() for s in shards] == [single.resolve()]:
        return  # the index names model.safetensors itself
    st = single.stat()
    key = (str(single.resolve()), st.st_mtime_ns, st.st_size)
    if key in _noted:
        return
    a, b = _tensors([single]), _tensors(shards)
    where = (f"{single.parent}: {single.name} and {index.name} hold different weights "
             f"(Hugging Face reads {single.name})")
    hint = "delete the stale one"
    if set(a) != set(b):
        name = sorted(set(a) ^ set(b))[0]
        raise LoadError(f"{where}: tensor {name} is only in "
                        f"{single.name if name in a else index.name}; {hint}")
    for name in sorted(a):
        (da, sa, fa, oa, na), (db, sb, fb, ob, nb) = a[name], b[name]
        if (da, sa, na) != (db, sb, nb):
            raise LoadError(f"{where}: tensor {name} is {da} {sa} in one and {db} {sb} in the "
                            f"other; {hint}")
        if not _same_bytes(fa, oa, fb, ob, na):
            raise LoadError(f"{where}: tensor {name} has other values; {hint}")
    _noted.add(key)
    log.warning("note: %s: %s and %s hold the same weights; reading %s", single.parent,
                single.name, index.name, single.name)


def _same_bytes(fa: Path, oa: int, fb: Path, ob: int, n: int) -> bool:
    with open(fa, "rb") as a, open(fb, "rb") as b:
        a.seek(oa)
        b.seek(ob)
        while n > 0:
            k = min(_CHUNK, n)
            if a.read(k) != b.read(k):
                return False
            n -= k
    return True


def checkpoint_shapes(path: Path, weights: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every tensor of the checkpoint (headers only)."""
    return {k: (v[0], v[1]) for k, v in _tensors(weight_files(path, weights)).items()}


# ------------------------------------------------------------------------- size bounds

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
    experts = (_first_int(config, *_EXPERT_COUNTS) or 0) + (
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
    experts = _first_int(config, *_EXPERT_COUNTS)
    if experts is not None and any(".experts." in k for k in shapes):
        per_expert = {int(m.group(1)) for k in shapes if (m := _EXPERT.search(k))}
        fused = [s[1][0] for k, s in shapes.items()
                 if ".experts." in k and not _EXPERT.search(k) and len(s[1]) == 3]
        held = max([len(per_expert), *fused])
        if held and experts > held:
            raise LoadError(f"{where}: the config has {experts} experts per layer but the "
                            f"checkpoint holds {held}")


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


def _check_fits_meta(config: Any, shapes: Mapping[str, tuple[str, list[int]]], weights: Path,
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


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sizes(config: Mapping[str, Any]) -> str:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "vocab_size", *_EXPERT_COUNTS)
    return ", ".join(f"{k} {config[k]}" for k in keys if type(config.get(k)) is int)


def _loads_float64(raw: Mapping[str, Any], dtype: Any,
                   shapes: Mapping[str, tuple[str, list[int]]]) -> bool:
    """Whether the load makes a float64 model (asked for, the config's, or the weights')."""
    if dtype is not None and dtype != "auto":
        return dtype in (torch.float64, "float64")
    named = raw.get("dtype", raw.get("torch_dtype"))
    if named not in (None, "auto"):
        return named == "float64"
    return any(d == "F64" for d, _ in shapes.values())


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


# ------------------------------------------------------------ parameters, per layer kind

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
    import copy

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
