"""Saving a RevModel as a model directory, loading one back, and the ``auto_map`` entry point."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import ExportError, LoadError, RevFFNError
from ..frontend.loading import check_config, load_model, quiet
from ..model import RevModel
from ..options import TransformOptions
from ..outdir import writing
from .checkpoint import (
    check_record,
    checkpoint_tensors,
    copy_extra_files,
    memory_tensors,
    seal,
    write_safetensors,
    write_shards,
)
from .layout import (
    ADAPTER_FILE,
    FORMAT_VERSION,
    count_params,
    parse_size,
    revffn_section,
    write_meta,
)


def _adapter_tensors(rev: RevModel) -> dict[str, torch.Tensor]:
    return {f"adapters.{k}": v for k, v in rev.adapters.state_dict().items()}


# ------------------------------------------------------------------------------ save and load

def save(rev: RevModel, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "2GB",
         safe_serialization: bool = True, is_main_process: bool = True) -> None:
    """Write ``rev`` (weights as they are now, e.g. after fine-tuning) to ``out_dir``.

    The base weights go through the model's own ``save_pretrained`` (so Hugging Face's key
    conversions and tied-weight handling apply), into a staging directory, and are then
    re-sharded with the adapters beside them. An existing ``out_dir`` keeps its other files
    (earlier weight shards are dropped) and is replaced in one step, like a new one
    (:func:`revffn_fx.outdir.writing`).
    """
    if not safe_serialization:
        raise ExportError("revffn-fx writes safetensors only (safe_serialization=False refused)")
    if not is_main_process:
        return
    limit = parse_size(max_shard_size)
    out = Path(out_dir).expanduser()
    if not hasattr(rev.model, "save_pretrained"):
        raise ExportError(f"{type(rev.model).__name__} is not a Hugging Face model: only "
                          "transformers models can be saved as a model directory")
    adapters = _adapter_tensors(rev)
    with writing(out, force=False, merge=True) as tmp:
        base = tmp / ".base"
        with quiet():
            rev.model.save_pretrained(base, max_shard_size="1000GB")
        _, entries = checkpoint_tensors(base)
        digests: dict[str, str] = {}
        write_shards(tmp, entries, limit, digests=digests)
        if adapters:
            digests[ADAPTER_FILE] = write_safetensors(tmp / ADAPTER_FILE,
                                                       memory_tensors(adapters))
        config = json.loads((base / "config.json").read_text())
        dtype = next(rev.model.parameters()).dtype
        section = revffn_section(rev, {k: list(v.shape) for k, v in adapters.items()}, dtype,
                           count_params(rev.model))
        write_meta(tmp, config, section)
        seal(tmp, digests)  # the record: weights, shim, config.json's fields
        copy_extra_files(base, tmp)
        shutil.rmtree(base)


def _read_section(config_path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    section = raw.get("revffn")
    if section is None:
        raise LoadError(f"{config_path}: no 'revffn' section: not a revffn-fx model directory "
                        "(use rf.load_model for a plain Hugging Face model)")
    if not isinstance(section, dict):
        raise LoadError(f"{config_path}: the 'revffn' section is not an object")
    version = section.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        newer = type(version) is int and version > FORMAT_VERSION
        raise LoadError(f"{config_path}: revffn format_version {version!r} is not one this "
                        f"revffn-fx reads (1 to {FORMAT_VERSION})"
                        + ("; upgrade revffn-fx" if newer else ""))
    options = section.get("transform")
    ok = (isinstance(options, dict) and isinstance(options.get("coupling"), str)
          and isinstance(options.get("layers"), list)
          and all(isinstance(i, int) for i in options["layers"])
          and isinstance(options.get("leaf_modules", []), list))
    adapters = section.get("adapters")
    ok = ok and (adapters is None or (isinstance(adapters, dict)
                                      and isinstance(adapters.get("shapes"), dict)))
    if not ok:
        raise LoadError(f"{config_path}: the 'revffn' section is broken: it needs "
                        "'transform' with 'coupling' and a list of 'layers', and 'adapters'")
    return section


def _custom_passes(section: dict[str, Any], config_path: Path,
                   passes: Sequence[Any] | None) -> list[Any]:
    """User passes recorded at save time must be given again: code is never named in config."""
    wanted = [p["name"] for p in section.get("passes", [])
              if isinstance(p, dict) and p.get("custom")]
    given = {getattr(p, "__name__", type(p).__name__): p for p in passes or []}
    missing = [n for n in wanted if n not in given]
    if missing:
        raise LoadError(f"{config_path}: saved with custom pass(es) {missing}; give them again: "
                        "rf.load(dir, passes=[...])")
    return [given[n] for n in wanted]


def load(out_dir: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
         passes: Sequence[Any] | None = None, check_files: bool = True,
         experts_implementation: str | None = None) -> RevModel:
    """Load a directory written by :func:`transform_dir` or :func:`save` (eval mode).

    The base model is loaded by ``from_pretrained`` (its own key conversions), the
    transform is replayed with the recorded options, then the adapters are loaded; the
    result computes bit for bit what was saved. ``dtype`` overrides the stored dtype.
    ``check_files``: compare config.json's fields, the shim and every weight file with the
    sha256 record written with them (a LoadError names what changed; a missing or
    malformed record is refused); reads the weights once more. ``experts_implementation``
    (``"eager"``, ``"grouped_mm"``, ...) goes to ``from_pretrained`` (default: transformers'
    choice; eager for a float64 model, which grouped_mm cannot run on the CPU).
    """
    path = Path(out_dir).expanduser()
    aside = sorted(path.absolute().parent.glob(f"{path.name}.revffn-old-*"))
    if not path.exists() and aside:  # a run killed between the two renames of a swap
        raise LoadError(f"{path}: missing: a killed revffn-transform left the complete previous "
                        f"directory at {aside[0]} (the next run into {path.name} restores it; or "
                        "rename it back)")
    config_path, model_type = check_config(path)
    raw = json.loads(config_path.read_text())
    section = _read_section(config_path, raw)
    options = section["transform"]
    custom = _custom_passes(section, config_path, passes)
    if check_files:
        check_record(path, raw, config_path)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    clean = {k: v for k, v in raw.items() if k not in ("revffn", "auto_map")}
    if raw.get("model_type") != model_type:  # an export's own "revffn" type: the original
        clean["model_type"] = model_type
        clean.pop("architectures", None)
    try:
        with quiet():
            config = CONFIG_MAPPING[model_type].from_dict(clean)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{config_path}: invalid config: {e}") from e
    extra = ({"experts_implementation": experts_implementation}
             if experts_implementation is not None else {})
    model = load_model(path, config=config, dtype=dtype, **extra)
    try:  # every recorded option (older files lack some: they take their defaults)
        recorded = TransformOptions.from_dict(options)
        rev = RevModel(model, passes=custom, options=recorded)
    except RevFFNError as e:
        raise LoadError(f"{config_path}: cannot replay the recorded transform: {e}") from e
    if rev.converted != sorted(options["layers"]):
        raise LoadError(f"{config_path}: replaying the transform converted layers "
                        f"{rev.converted}, the directory records {options['layers']}")
    expected = _adapter_tensors(rev)
    if expected:
        file = path / ADAPTER_FILE
        if not file.is_file():
            raise LoadError(f"{file}: missing (the {rev.coupling} adapters)")
        try:
            tensors = load_file(file)
        except Exception as e:  # safetensors raises its own SafetensorError
            raise LoadError(f"{file}: truncated or corrupted safetensors file ({e})") from e
        if set(tensors) != set(expected):
            odd = sorted(set(tensors) ^ set(expected))[0]
            raise LoadError(f"{file}: adapter tensors do not fit the model, e.g. {odd}")
        for k, t in tensors.items():
            if t.shape != expected[k].shape:
                raise LoadError(f"{file}: tensor {k} has shape {list(t.shape)} but the model "
                                f"needs {list(expected[k].shape)}")
        with torch.no_grad():
            rev.adapters.load_state_dict({k[len("adapters."):]: v for k, v in tensors.items()})
    return rev.eval()


def _config_class() -> Any:
    from transformers import PretrainedConfig

    class RevFFNConfig(PretrainedConfig):
        """The ``auto_map`` AutoConfig of an export whose function is not the original
        architecture's (model_type "revffn"): only an entry point; ``rf.load`` rebuilds
        the original config from the fields and the revffn section."""

        model_type = "revffn"

    return RevFFNConfig


RevFFNConfig = _config_class()


class RevFFNForCausalLM:
    """The ``auto_map`` target: ``AutoModelForCausalLM.from_pretrained(dir,
    trust_remote_code=True)`` lands here and returns :func:`load`'s RevModel."""

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModelForCausalLM") -> None:
        """Nothing to register: the class is only an entry point."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        *args: Any, **kwargs: Any) -> RevModel:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load(pretrained_model_name_or_path, dtype=None if dtype == "auto" else dtype,
                    experts_implementation=kwargs.get("experts_implementation"))
