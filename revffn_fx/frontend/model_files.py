"""The files of a local model directory that revffn-fx reads: none may lead outside it
(:func:`inside`), and its safetensors weights (which files, their headers, checked).

Pickled checkpoints (pytorch_model.bin) are refused everywhere: unpickling runs code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from revffn_fx.errors import LoadError

# The weight files read, in from_pretrained's order of preference (model.safetensors first:
# where both exist they must hold the same tensors). Pickled checkpoints
# (pytorch_model.bin) are refused everywhere: unpickling runs code.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
_PICKLED = ("pytorch_model.bin.index.json", "pytorch_model.bin")
_CHUNK = 16 << 20
log = logging.getLogger("revffn_fx.load")
_noted: set[tuple[str, int, int]] = set()


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
