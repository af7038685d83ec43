"""Checkpoint files: reading and writing safetensors shards, the staging directory with its
atomic rename, and copying the tokenizer and other extras."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..errors import ExportError, LoadError
from ..loading import _check_weights
from .layout import ADAPTER_FILE, EXTRA_FILES, INDEX_NAME, TOKENIZER_FILES, WEIGHTS_NAME

_CHUNK = 16 << 20  # bytes per read when copying tensors: bounds the memory of a copy

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------- safetensors IO

@dataclass
class _Tensor:
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
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise LoadError(f"{file}: truncated or corrupted safetensors file ({e})") from e
    return header, 8 + n


def _entries_of(header: dict[str, Any], start: int, file: Path | None = None,
                data: bytes | None = None) -> list[_Tensor]:
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        out.append(_Tensor(name, info["dtype"], list(info["shape"]), e - b, file, start + b, data))
    return sorted(out, key=lambda t: t.offset)


def _checkpoint_entries(model_dir: Path) -> tuple[Path, list[_Tensor]]:
    """The weights file (after loading.py's checks) and every tensor of the checkpoint."""
    weights = _check_weights(model_dir)
    if not weights.name.endswith(".safetensors") and not weights.name == INDEX_NAME:
        raise LoadError(f"{weights}: only safetensors checkpoints can be transformed "
                        "(revffn-fx never unpickles .bin files)")
    if weights.name == INDEX_NAME:
        files = sorted({model_dir / s for s in json.loads(weights.read_text())["weight_map"]
                        .values()})
    else:
        files = [weights]
    entries: list[_Tensor] = []
    seen: dict[str, Path] = {}
    for file in files:
        header, start = _read_header(file)
        for t in _entries_of(header, start, file=file):
            if t.name in seen:
                raise LoadError(f"{file}: tensor {t.name} is also in {seen[t.name].name}")
            seen[t.name] = file
            entries.append(t)
    return weights, entries


def _blob_entries(tensors: dict[str, torch.Tensor]) -> list[_Tensor]:
    """Entries for small in-memory tensors, serialised by safetensors itself."""
    blob = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    (n,) = struct.unpack("<Q", blob[:8])
    return _entries_of(json.loads(blob[8:8 + n]), 8 + n, data=blob)


def _write_safetensors(path: Path, entries: Sequence[_Tensor]) -> None:
    """Write ``entries`` as one safetensors file, streaming the bytes from their sources."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in entries:
        header[t.name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        src_name, src = None, None
        try:
            for t in entries:
                if t.data is not None:
                    out.write(t.data[t.offset:t.offset + t.nbytes])
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
                    out.write(chunk)
                    left -= len(chunk)
        finally:
            if src is not None:
                src.close()


def _write_shards(out: Path, entries: Sequence[_Tensor], max_shard_size: int,
                  progress: Progress | None = None) -> list[str]:
    """Write the base weights in Hugging Face's layout; return the file names written."""
    shards: list[list[_Tensor]] = [[]]
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
        _write_safetensors(out / name, shard)
    if progress:
        progress(n, n, names[-1])
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in entries)},
                 "weight_map": {t.name: name for name, shard in zip(names, shards)
                                for t in shard}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        names.append(INDEX_NAME)
    return names


# ------------------------------------------------------------------------------ OUT_DIR safety

def _check_out_dir(out: Path, force: bool, model_dir: Path | None = None) -> None:
    """Refuse an OUT_DIR that would clobber something, before any work is done."""
    if model_dir is not None:
        src, dst = model_dir.resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise ExportError(f"{out}: OUT_DIR must not be MODEL_DIR or inside it ({model_dir})")
        if dst in src.parents:  # --force would delete MODEL_DIR with the old OUT_DIR
            raise ExportError(f"{out}: OUT_DIR must not contain MODEL_DIR ({model_dir})")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out}: not empty (use --force / force=True to replace it)")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: not writable ({parent} is not a writable directory)")


@contextmanager
def _staging(out: Path, replace: bool) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` only if the body succeeds.

    ``replace``: an existing ``out`` is replaced as a whole; otherwise (save_pretrained
    into an existing directory) the staged files are moved into it, one by one.
    """
    created: list[Path] = []
    parent = out.resolve().parent
    for p in [parent, *parent.parents]:
        if p.exists():
            break
        created.append(p)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.revffn-tmp-", dir=parent))
    except OSError as e:
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
        raise ExportError(f"{out}: not writable: {e.strerror or e}") from e
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()) and not replace:
            for stale in [*out.glob("model*.safetensors"), out / INDEX_NAME, out / ADAPTER_FILE]:
                stale.unlink(missing_ok=True)  # shards of an earlier save must not linger
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
            tmp.rmdir()
        else:
            if out.exists():
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created:
            shutil.rmtree(p, ignore_errors=True)
        raise

def _copy_extras(src: Path, out: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, *EXTRA_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied
