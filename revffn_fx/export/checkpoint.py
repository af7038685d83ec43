"""Checkpoint files: reading and writing safetensors shards, copying the tokenizer and other
extras (OUT_DIR itself is handled by :mod:`revffn_fx.outdir`).

The reader/writer used by :mod:`.transform` and :mod:`.save_load`:

- :class:`TensorEntry`: one tensor's header entry and where its bytes are (a file or memory)
- :func:`checkpoint_tensors`: the weights file of a model directory and all its entries
- :func:`memory_tensors`: entries for in-memory tensors (the adapters)
- :func:`write_safetensors` / :func:`write_shards`: stream entries into one file / into
  Hugging Face's shard layout, returning sha256 digests computed on the way
- :func:`extra_files` / :func:`copy_extra_files`: the tokenizer and generation files
- :func:`file_sha256` / :func:`check_sha256`: the integrity record of the ``revffn`` section
- :data:`SAFETENSORS_DTYPES`: safetensors dtype codes -> torch dtypes
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..errors import LoadError
from ..frontend.loading import check_weights, index_shards, inside
from ..outdir import pause
from .layout import EXTRA_FILES, INDEX_NAME, TOKENIZER_FILES, WEIGHTS_NAME

_CHUNK = 16 << 20  # bytes per read when copying tensors: bounds the memory of a copy

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

Progress = Callable[[int, int, str], None]

__all__ = ["SAFETENSORS_DTYPES", "Progress", "TensorEntry", "check_sha256", "checkpoint_tensors",
           "copy_extra_files", "extra_files", "file_sha256", "memory_tensors",
           "write_safetensors", "write_shards"]


# ----------------------------------------------------------------------------- safetensors IO

@dataclass
class TensorEntry:
    """One tensor to write: its header entry and where its bytes come from."""

    name: str
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: list[int]
    nbytes: int
    file: Path | None = None  # read ``nbytes`` at ``offset`` of ``file`` ...
    offset: int = 0
    data: bytes | None = None  # ... or slice this in-memory blob at ``offset``


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
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


def _entries_of(header: dict[str, Any], start: int, file: Path | None = None,
                data: bytes | None = None) -> list[TensorEntry]:
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out.append(TensorEntry(name, info["dtype"], list(info["shape"]), e - b, file, start + b,
                               data))
    return sorted(out, key=lambda t: t.offset)


def checkpoint_tensors(model_dir: Path) -> tuple[Path, list[TensorEntry]]:
    """The weights file (after loading.py's checks) and every tensor of the checkpoint."""
    weights = check_weights(model_dir)
    if not weights.name.endswith(".safetensors") and not weights.name == INDEX_NAME:
        raise LoadError(f"{weights}: only safetensors checkpoints can be transformed "
                        "(revffn-fx never unpickles .bin files)")
    if weights.name == INDEX_NAME:
        files = [model_dir / s for s in index_shards(weights)]
    else:
        files = [weights]
    entries: list[TensorEntry] = []
    seen: dict[str, Path] = {}
    for file in files:
        header, start = _read_header(file)
        for t in _entries_of(header, start, file=file):
            if t.name in seen:
                raise LoadError(f"{file}: tensor {t.name} is also in {seen[t.name].name}")
            seen[t.name] = file
            entries.append(t)
    return weights, entries


def memory_tensors(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    """Entries for small in-memory tensors, serialised by safetensors itself."""
    blob = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return _entries_of(json.loads(blob[8:8 + n]), 8 + n, data=blob)


def write_safetensors(path: Path, entries: Sequence[TensorEntry]) -> str:
    """Write ``entries`` as one safetensors file, streaming the bytes from their sources;
    return the file's sha256 (computed on the way: no second read)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in entries:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        def out_write(data: bytes | memoryview) -> None:
            digest.update(data)
            f.write(data)

        out_write(struct.pack("<Q", len(raw)))
        out_write(raw)
        src_name, src = None, None
        try:
            for t in entries:
                if t.data is not None:
                    out_write(t.data[t.offset:t.offset + t.nbytes])
                    continue
                if t.file != src_name:
                    if src is not None:
                        src.close()
                    src_name, src = t.file, open(t.file, "rb")  # noqa: SIM115
                assert src is not None
                src.seek(t.offset)
                left = t.nbytes
                while left:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise LoadError(f"{t.file}: truncated safetensors file (tensor {t.name})")
                    out_write(chunk)
                    left -= len(chunk)
        finally:
            if src is not None:
                src.close()
    return digest.hexdigest()


def write_shards(out: Path, entries: Sequence[TensorEntry], max_shard_size: int,
                  progress: Progress | None = None,
                  digests: dict[str, str] | None = None) -> list[str]:
    """Write the base weights in Hugging Face's layout; return the file names written.
    ``digests`` receives the sha256 of each file written (shards and index)."""
    digests = {} if digests is None else digests
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for t in entries:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                           for i in range(n)]
    for i, (name, shard) in enumerate(zip(names, shards)):
        if progress:
            progress(i, n, name)
        digests[name] = write_safetensors(out / name, shard)
        pause("shard")
    if progress:
        progress(n, n, names[-1])
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in entries)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards)
                                for t in shard}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        digests[INDEX_NAME] = file_sha256(out / INDEX_NAME)
        names.append(INDEX_NAME)
    return names


# ---------------------------------------------------------------------------------- integrity

def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in bounded chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, recorded: Any, config_path: Path) -> None:
    """Every file named in the ``sha256`` record of the revffn section still has its bytes.

    Directories written before the record existed have none and are not checked.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()):
        raise LoadError(f"{config_path}: the 'revffn' section's sha256 record is broken")
    for name, want in sorted(recorded.items()):
        file = path / name
        if Path(name).name != name or not os.path.lexists(file):
            raise LoadError(f"{file}: missing (config.json records its sha256)")
        inside(file, path)
        got = file_sha256(file)
        if got != want:
            raise LoadError(f"{file}: changed since it was written (sha256 {got[:12]}..., "
                            f"config.json records {want[:12]}...): the file is damaged or was "
                            "replaced")


def extra_files(src: Path) -> list[str]:
    """The tokenizer and extra files of ``src``; each must be a regular file inside it."""
    found = []
    for name in (*TOKENIZER_FILES, *EXTRA_FILES):
        if os.path.lexists(src / name):
            inside(src / name, src)  # refuses links out of MODEL_DIR, FIFOs, devices
            if (src / name).is_file():
                found.append(name)
    return found


def copy_extra_files(src: Path, out: Path) -> list[str]:
    """Copy :func:`extra_files` of ``src`` into ``out``; return their names."""
    copied = extra_files(src)
    for name in copied:
        shutil.copyfile(src / name, out / name)
    return copied
