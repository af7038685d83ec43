"""Checkpoint files: reading and writing safetensors shards, copying the tokenizer and other
extras (OUT_DIR itself is handled by :mod:`revffn_fx.outdir`).

The reader/writer used by :mod:`.saving` and :mod:`revffn_fx.export.transform`:

- :class:`TensorEntry`: one tensor's header entry and where its bytes are (a file or memory)
- :func:`checkpoint_tensors`: the weights file of a model directory and all its entries
- :func:`memory_tensors`: entries for in-memory tensors (the adapters)
- :func:`write_safetensors` / :func:`write_shards`: stream entries into one file / into
  Hugging Face's shard layout, returning sha256 digests computed on the way
- :func:`extra_files` / :func:`copy_extra_files`: the tokenizer and generation files
- :func:`file_sha256`, :func:`seal` / :func:`check_record`: the integrity record of the
  ``revffn`` section (sha256 of the weight files, the shim, and config.json's fields)
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
from ..frontend.loading import check_weights, index_shards, inside, read_header
from ..outdir import pause
from .layout import EXTRA_FILES, INDEX_NAME, SHIM_FILE, TOKENIZER_FILES, WEIGHTS_NAME

_CHUNK = 16 << 20  # bytes per read when copying tensors: bounds the memory of a copy

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

Progress = Callable[[int, int, str], None]

__all__ = ["SAFETENSORS_DTYPES", "Progress", "TensorEntry", "check_record", "check_sha256",
           "checkpoint_tensors", "copy_extra_files", "extra_files", "file_sha256",
           "memory_tensors", "seal", "write_safetensors", "write_shards"]

#: the record's entries for config.json: its ``revffn`` section (less the record) and the
#: rest of its fields (the model config, ``auto_map``)
SECTION_KEY, CONFIG_KEY = "config.json:revffn", "config.json"
_FLOATS = {"F64", "F32", "F16", "BF16"}


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


_read_header = read_header


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


def write_safetensors(path: Path, entries: Sequence[TensorEntry],
                      check_finite: bool = False) -> str:
    """Write ``entries`` as one safetensors file, streaming the bytes from their sources;
    return the file's sha256 (computed on the way: no second read). ``check_finite``: a
    floating tensor holding NaN or Inf is a LoadError naming it (checked on the way too)."""
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
        buf = bytearray(_CHUNK)
        try:
            for t in entries:
                finite = check_finite and t.dtype in _FLOATS
                if t.data is not None:
                    blob = t.data[t.offset:t.offset + t.nbytes]
                    if finite:
                        _check_finite(bytearray(blob), len(blob), t)
                    out_write(blob)
                    continue
                if t.file != src_name:
                    if src is not None:
                        src.close()
                    src_name, src = t.file, open(t.file, "rb")  # noqa: SIM115
                assert src is not None
                src.seek(t.offset)
                left = t.nbytes
                while left:
                    view = memoryview(buf)[:min(_CHUNK, left)]
                    got = src.readinto(view)
                    if not got:
                        raise LoadError(f"{t.file}: truncated safetensors file (tensor {t.name})")
                    if finite:
                        _check_finite(buf, got, t)
                    out_write(view[:got])
                    left -= got
        finally:
            if src is not None:
                src.close()
    return digest.hexdigest()


def _check_finite(buf: bytearray, n: int, t: TensorEntry) -> None:
    """NaN or Inf among the first ``n`` bytes of ``buf`` (a slice of tensor ``t``)."""
    dtype = SAFETENSORS_DTYPES[t.dtype]
    size = torch.tensor([], dtype=dtype).element_size()
    if n % size:  # a short read mid-element: check what is whole (the rest comes next)
        n -= n % size
    if n and not bool(torch.isfinite(torch.frombuffer(buf, dtype=dtype, count=n // size)).all()):
        where = t.file if t.file is not None else "the adapters"
        raise LoadError(f"{where}: tensor {t.name} holds NaN or Inf values: refused (a model "
                        "with them trains to NaN); --allow-nonfinite / allow_nonfinite=True "
                        "writes it anyway")


def write_shards(out: Path, entries: Sequence[TensorEntry], max_shard_size: int,
                  progress: Progress | None = None,
                  digests: dict[str, str] | None = None,
                  check_finite: bool = False) -> list[str]:
    """Write the base weights in Hugging Face's layout; return the file names written.
    ``digests`` receives the sha256 of each file written (shards and index);
    ``check_finite``: refuse a tensor holding NaN or Inf (:func:`write_safetensors`)."""
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
        digests[name] = write_safetensors(out / name, shard, check_finite)
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


def _canonical(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def config_digests(raw: dict[str, Any]) -> dict[str, str]:
    """The record's entries for config.json: the ``revffn`` section without the record,
    and every other field (the model config, ``auto_map``), each as canonical JSON."""
    section = {k: v for k, v in raw.get("revffn", {}).items() if k != "sha256"}
    return {SECTION_KEY: _canonical(section),
            CONFIG_KEY: _canonical({k: v for k, v in raw.items() if k != "revffn"})}


def seal(out: Path, digests: dict[str, str]) -> None:
    """Write the record into ``out/config.json``'s ``revffn`` section: the sha256 of the
    weight files (``digests``, computed while writing them), of the shim, and of
    config.json's own fields (:func:`config_digests`). Call it after config.json is final."""
    config_path = out / "config.json"
    raw = json.loads(config_path.read_text())
    record = dict(digests)
    if (out / SHIM_FILE).is_file():
        record[SHIM_FILE] = file_sha256(out / SHIM_FILE)
    record.update(config_digests(raw))
    raw["revffn"]["sha256"] = record
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


_HINT = ("rf.load(dir, check_files=False) or `revffn verify --no-check` loads it without the "
         "check")


def check_record(path: Path, raw: dict[str, Any], config_path: Path) -> None:
    """The record of the ``revffn`` section (:func:`seal`) against the directory: config.json's
    fields and every file it names. A missing or malformed record is refused (removing it
    must not turn the check off)."""
    recorded = raw["revffn"].get("sha256")
    if recorded is None:
        raise LoadError(f"{config_path}: the 'revffn' section has no sha256 record, so nothing "
                        f"in the directory can be checked: refused; {_HINT}")
    if not isinstance(recorded, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in
            recorded.items()):
        raise LoadError(f"{config_path}: the 'revffn' section's sha256 record is malformed "
                        f"(it must map file names to sha256 digests): refused; {_HINT}")
    needed = [SECTION_KEY, CONFIG_KEY, SHIM_FILE]
    missing = [k for k in needed if k not in recorded]
    if not any(k in recorded for k in (WEIGHTS_NAME, INDEX_NAME)):
        missing.append(WEIGHTS_NAME)
    if missing:
        raise LoadError(f"{config_path}: the sha256 record has no entry for {missing[0]} (an "
                        "older revffn-fx wrote it, or it was edited): refused; " + _HINT
                        + ", and save_pretrained writes a full record")
    got = config_digests(raw)
    if got[SECTION_KEY] != recorded[SECTION_KEY]:
        raise LoadError(f"{config_path}: its 'revffn' section changed since it was written (it "
                        "decides the function loaded: coupling, layers, options); restore it, "
                        f"or {_HINT}")
    if got[CONFIG_KEY] != recorded[CONFIG_KEY]:
        raise LoadError(f"{config_path}: its model config fields changed since it was written "
                        f"(sizes, rope, norms and routing decide the function); restore them, "
                        f"or {_HINT}")
    check_sha256(path, {k: v for k, v in recorded.items() if k not in (SECTION_KEY, CONFIG_KEY)},
                 config_path)


def check_sha256(path: Path, recorded: dict[str, str], config_path: Path) -> None:
    """Every file named in ``recorded`` still has its bytes."""
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
