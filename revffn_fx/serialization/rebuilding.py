"""Rebuilding a RevModel from a model directory: the base model by ``from_pretrained``,
the transform replayed with the recorded options, the adapters loaded.

The class to build is passed in (``RevModel``, or the class ``from_pretrained`` is
called on), so this module sits below :mod:`revffn_fx.model`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import LoadError, RevFFNError
from ..frontend.loading import check_config, load_model, quiet
from ..options import TransformOptions
from .checkpoint_files import check_record
from .layout import ADAPTER_FILE, FORMAT_VERSION
from .saving import adapter_tensors


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


def _refuse_swapped_aside(path: Path) -> None:
    aside = sorted(path.absolute().parent.glob(f"{path.name}.revffn-old-*"))
    if not path.exists() and aside:  # a run killed between the two renames of a swap
        raise LoadError(f"{path}: missing: a killed revffn-transform left the complete previous "
                        f"directory at {aside[0]} (the next run into {path.name} restores it; or "
                        "rename it back)")


def _base_config(config_path: Path, model_type: str, raw: dict[str, Any]) -> Any:
    """The original architecture's config: the fields without the revffn section and the
    auto_map (an export's own "revffn" model type back to the original's)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    clean = {k: v for k, v in raw.items() if k not in ("revffn", "auto_map")}
    if raw.get("model_type") != model_type:  # an export's own "revffn" type: the original
        clean["model_type"] = model_type
        clean.pop("architectures", None)
    try:
        with quiet():
            return CONFIG_MAPPING[model_type].from_dict(clean)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{config_path}: invalid config: {e}") from e


def _replay(cls: type, model: torch.nn.Module, custom: list[Any], options: dict[str, Any],
            config_path: Path) -> Any:
    """``cls(model, ...)`` with every recorded option (older files lack some: they take
    their defaults); it must convert the recorded layers."""
    try:
        recorded = TransformOptions.from_dict(options)
        rev = cls(model, passes=custom, options=recorded)
    except RevFFNError as e:
        raise LoadError(f"{config_path}: cannot replay the recorded transform: {e}") from e
    if rev.converted != sorted(options["layers"]):
        raise LoadError(f"{config_path}: replaying the transform converted layers "
                        f"{rev.converted}, the directory records {options['layers']}")
    return rev


def _load_adapters(rev: Any, path: Path) -> None:
    """Load the adapter file into ``rev.adapters``, checking names and shapes."""
    expected = adapter_tensors(rev)
    if not expected:
        return
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


def rebuild(cls: type, out_dir: str | os.PathLike[str], *,
            dtype: torch.dtype | str | None = None, passes: Sequence[Any] | None = None,
            check_files: bool = True, experts_implementation: str | None = None) -> Any:
    """Load a directory written by ``transform_dir`` or ``save`` as a ``cls`` (a RevModel
    class), in eval mode; :func:`revffn_fx.export.load` documents the arguments."""
    path = Path(out_dir).expanduser()
    _refuse_swapped_aside(path)
    config_path, model_type = check_config(path)
    raw = json.loads(config_path.read_text())
    section = _read_section(config_path, raw)
    custom = _custom_passes(section, config_path, passes)
    if check_files:
        check_record(path, raw, config_path)
    config = _base_config(config_path, model_type, raw)
    extra = ({"experts_implementation": experts_implementation}
             if experts_implementation is not None else {})
    model = load_model(path, config=config, dtype=dtype, **extra)
    rev = _replay(cls, model, custom, section["transform"], config_path)
    _load_adapters(rev, path)
    return rev.eval()
