"""Saving a RevModel as a model directory (what ``rev.save_pretrained`` writes)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import ExportError
from ..frontend.loading import quiet
from ..outdir import writing
from .checkpoint_files import (
    checkpoint_tensors,
    copy_extra_files,
    memory_tensors,
    seal,
    write_safetensors,
    write_shards,
)
from .layout import ADAPTER_FILE, count_params, parse_size, revffn_section, write_meta


def adapter_tensors(rev: Any) -> dict[str, torch.Tensor]:
    return {f"adapters.{k}": v for k, v in rev.adapters.state_dict().items()}


def save(rev: Any, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "2GB",
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
    adapters = adapter_tensors(rev)
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
