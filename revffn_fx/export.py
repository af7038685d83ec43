"""Export: write a transformed model as a Hugging Face directory, and load it back.

OUT_DIR layout::

    config.json                      the original config + "revffn" section + "auto_map"
    model.safetensors                the original architecture's weights, HF on-disk names
      (or model-0000k-of-0000n.safetensors + model.safetensors.index.json above max_shard_size)
    revffn_adapters.safetensors      the new revffn adapter weights (absent for revnet)
    modeling_revffn.py               a shim: AutoModelForCausalLM(..., trust_remote_code=True)
    README.md                        model card
    tokenizer*.json, ...             copied from MODEL_DIR when it had them

Weight names. The original weights keep the names Hugging Face itself writes on disk
(``save_pretrained`` turns in-memory fused experts into legacy per-expert tensors for
mixtral and deepseek). Loading goes through ``from_pretrained`` on the original
architecture, so Hugging Face's own key conversions run in both directions and the round
trip is bit-exact; OUT_DIR minus the adapter file is an ordinary checkpoint of the base
architecture. The adapters, which Hugging Face does not know, live in their own file under
their RevModel names (``adapters.<layer>.F_up.weight``), outside the index, so
``from_pretrained`` never sees them as unexpected keys.

Loading (:func:`load`) rebuilds the RevModel by replaying ``transform`` with the options
recorded in the ``revffn`` section on the base model loaded from OUT_DIR, then loads the
adapter file. Only safetensors are read: no pickled code runs.

:func:`transform_dir` never materialises the model: it builds the architecture from
config.json on the meta device, checks the checkpoint's tensor names and shapes against it
with Hugging Face's own conversion rules (on meta tensors), traces and transforms on meta,
then copies the checkpoint's bytes shard by shard into OUT_DIR. Peak memory is one read
buffer, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from .errors import ConversionError, ExportError, LoadError, RevFFNError
from .loading import _check_config, _check_weights, _quiet, load_model
from .model import RevModel, parse_layers
from .registry import facts_for

FORMAT_VERSION = 1
ADAPTER_FILE = "revffn_adapters.safetensors"
SHIM_FILE = "modeling_revffn.py"
SHIM_CLASS = "RevFFNForCausalLM"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files carried over from MODEL_DIR besides the weights: tokenizer and generation defaults.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json")
EXTRA_FILES = ("generation_config.json",)
_CHUNK = 16 << 20  # bytes per read when copying tensors: bounds the memory of a copy

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

Progress = Callable[[int, int, str], None]

_SHIM = f'''"""Loader for a revffn-fx model directory (written by revffn-fx; holds no model code).

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(this_dir, trust_remote_code=True)

needs revffn-fx installed (pip install revffn-fx): it rebuilds the reversible model from
config.json's "revffn" section and loads the safetensors weights (``revffn_fx.load``).
"""

from revffn_fx.export import {SHIM_CLASS}

__all__ = ["{SHIM_CLASS}"]
'''


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


def parse_size(size: int | str) -> int:
    """``"2GB"`` (10^9), ``"500MiB"`` (2^20), or a byte count -> bytes."""
    if isinstance(size, int):
        value = size
    else:
        from transformers.utils.hub import convert_file_size_to_int

        try:
            value = convert_file_size_to_int(size.strip())
        except (ValueError, AttributeError):
            raise ExportError(f"bad shard size {size!r}: use e.g. 500MB or 2GB") from None
    if value <= 0:
        raise ExportError(f"bad shard size {size!r}: must be positive")
    return value


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


# ------------------------------------------------------------------------- config and metadata

def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"revffn_fx": __version__, "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__}


def _section(rev: RevModel, adapter_shapes: dict[str, list[int]], dtype: torch.dtype,
             params_before: int) -> dict[str, Any]:
    """The ``revffn`` config section: everything :func:`load` needs to replay the transform."""
    custom = [getattr(p, "__name__", type(p).__name__) for p in rev.user_passes]
    leaf = list(getattr(getattr(rev, "traced", None), "leaf_modules", ()) or ())
    checkpoint_rest = bool(getattr(rev, "checkpoint_rest", False))
    loss_head = getattr(rev, "loss_head", None)
    options: dict[str, Any] = {"coupling": rev.coupling, "layers": list(rev.converted),
                               "leaf_modules": leaf, "checkpoint_rest": checkpoint_rest}
    if loss_head is not None:
        options["loss_head"] = loss_head
    if getattr(rev, "attention", "plain") != "plain":
        options["attention"] = rev.attention
        options["fixed_point_iters"] = rev.options.fixed_point_iters
        options["fixed_point_tol"] = rev.options.fixed_point_tol
    return {
        "format_version": FORMAT_VERSION,
        "coupling": rev.coupling,
        "layers": list(rev.converted),
        "num_layers": len(rev.plan.layers),
        "hidden_size": rev.hidden_size,
        "transform": options,
        "passes": [
            {"name": "analyze", "scope": "model"},
            {"name": "couple", "scope": "layer", "options": {"coupling": rev.coupling}},
            *({"name": n, "scope": "layer", "custom": True} for n in custom),
            {"name": "inverse", "scope": "layer"},
            {"name": "fuse", "scope": "model", "options": {"checkpoint_rest": checkpoint_rest}},
            *([{"name": "loss_head", "scope": "model", "options": {"loss_head": loss_head}}]
              if loss_head is not None else []),
        ],
        "adapters": ({"file": ADAPTER_FILE, "dtype": str(dtype).replace("torch.", ""),
                      "shapes": adapter_shapes} if adapter_shapes else None),
        "parameters": {"original": params_before,
                       "added": sum(_numel(s) for s in adapter_shapes.values())},
        "versions": _versions(),
    }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() skips tied duplicates


def _layer_span(layers: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _model_card(config: dict[str, Any], section: dict[str, Any]) -> str:
    p = section["parameters"]
    layers = section["layers"]
    v = section["versions"]
    pct = 100 * p["added"] / max(p["original"], 1)
    added = (f"{p['added']:,} adapter parameters added ({pct:.2f}% of {p['original']:,})"
             if p["added"] else "no parameters added")
    return f"""---
library_name: transformers
tags:
- revffn-fx
- reversible
- mixture-of-experts
---

# {config.get("model_type", "model")} with reversible decoder layers (revffn-fx)

This directory was written by revffn-fx {v['revffn_fx']} (torch {v['torch']}, transformers
{v['transformers']}). Decoder layers {_layer_span(layers)} of {section['num_layers']} were
rewritten into **{section['coupling']}** reversible couplings: their attention and MoE
sublayers are the two halves of a coupling, so backward recomputes activations from the
layer outputs instead of storing them. The pretrained weights are unchanged; {added}.

```python
import revffn_fx as rf
model = rf.load("this_dir")   # or AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
```

Fine-tune it like any causal LM (`model(input_ids, labels=labels).loss.backward()`) and save
with `model.save_pretrained(dir)`. `config.json`'s `revffn` section records what was done.
"""


def _write_meta(out: Path, config: dict[str, Any], section: dict[str, Any]) -> list[str]:
    """config.json (with ``revffn`` and ``auto_map``), the loader shim and the model card."""
    config = {k: v for k, v in config.items() if k not in ("revffn", "auto_map")}
    config["revffn"] = section
    config["auto_map"] = {"AutoModelForCausalLM": f"{SHIM_FILE[:-3]}.{SHIM_CLASS}"}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / SHIM_FILE).write_text(_SHIM)
    (out / "README.md").write_text(_model_card(config, section))
    return ["config.json", SHIM_FILE, "README.md"]


def _copy_extras(src: Path, out: Path) -> list[str]:
    copied = []
    for name in (*TOKENIZER_FILES, *EXTRA_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            copied.append(name)
    return copied


def _adapter_tensors(rev: RevModel) -> dict[str, torch.Tensor]:
    return {f"adapters.{k}": v for k, v in rev.adapters.state_dict().items()}


# ------------------------------------------------------------------------------ save and load

def save(rev: RevModel, out_dir: str | os.PathLike[str], *, max_shard_size: int | str = "2GB",
         safe_serialization: bool = True, is_main_process: bool = True) -> None:
    """Write ``rev`` (weights as they are now, e.g. after fine-tuning) to ``out_dir``.

    The base weights go through the model's own ``save_pretrained`` (so Hugging Face's key
    conversions and tied-weight handling apply), into a staging directory, and are then
    re-sharded with the adapters beside them. An existing ``out_dir`` is updated in place
    (earlier weight shards are removed); a new one appears atomically.
    """
    if not safe_serialization:
        raise ExportError("revffn-fx writes safetensors only (safe_serialization=False refused)")
    if not is_main_process:
        return
    limit = parse_size(max_shard_size)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
    if not hasattr(rev.model, "save_pretrained"):
        raise ExportError(f"{type(rev.model).__name__} is not a Hugging Face model: only "
                          "transformers models can be saved as a model directory")
    adapters = _adapter_tensors(rev)
    with _staging(out, replace=False) as tmp:
        base = tmp / ".base"
        with _quiet():
            rev.model.save_pretrained(base, max_shard_size="1000GB")
        _, entries = _checkpoint_entries(base)
        _write_shards(tmp, entries, limit)
        if adapters:
            _write_safetensors(tmp / ADAPTER_FILE, _blob_entries(adapters))
        config = json.loads((base / "config.json").read_text())
        dtype = next(rev.model.parameters()).dtype
        section = _section(rev, {k: list(v.shape) for k, v in adapters.items()}, dtype,
                           _count_params(rev.model))
        _write_meta(tmp, config, section)
        _copy_extras(base, tmp)
        shutil.rmtree(base)


def _read_section(config_path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    section = raw.get("revffn")
    if section is None:
        raise LoadError(f"{config_path}: no 'revffn' section: not a revffn-fx model directory "
                        "(use rf.load_model for a plain Hugging Face model)")
    if not isinstance(section, dict):
        raise LoadError(f"{config_path}: the 'revffn' section is not an object")
    version = section.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LoadError(f"{config_path}: revffn format_version {version!r} is not supported by "
                        f"this revffn-fx (reads up to {FORMAT_VERSION}); upgrade revffn-fx")
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
         passes: Sequence[Any] | None = None) -> RevModel:
    """Load a directory written by :func:`transform_dir` or :func:`save` (eval mode).

    The base model is loaded by ``from_pretrained`` (its own key conversions), the
    transform is replayed with the recorded options, then the adapters are loaded; the
    result computes bit for bit what was saved. ``dtype`` overrides the stored dtype.
    """
    path = Path(out_dir).expanduser()
    config_path, model_type = _check_config(path)
    raw = json.loads(config_path.read_text())
    section = _read_section(config_path, raw)
    options = section["transform"]
    custom = _custom_passes(section, config_path, passes)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    clean = {k: v for k, v in raw.items() if k not in ("revffn", "auto_map")}
    try:
        with _quiet():
            config = CONFIG_MAPPING[model_type].from_dict(clean)
    except (ValueError, TypeError, KeyError) as e:
        raise LoadError(f"{config_path}: invalid config: {e}") from e
    model = load_model(path, config=config, dtype=dtype)
    # options added to transform after format 1 are passed only when recorded
    kw = {k: options[k] for k in ("checkpoint_rest", "loss_head", "attention",
                                  "fixed_point_iters", "fixed_point_tol") if k in options}
    try:
        rev = RevModel(model, options["coupling"], options["layers"], custom,
                       options.get("leaf_modules", ()), **kw)
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
        return load(pretrained_model_name_or_path, dtype=None if dtype == "auto" else dtype)


# ------------------------------------------------------------------------------ transform_dir

def _activation_estimate(config: Any, coupling: str, batch: int = 8,
                         seq: int = 2048) -> tuple[int, int, int, int] | None:
    """Saved-for-backward bytes without checkpointing and with ``coupling``, or None when
    the config lacks what the estimator reads."""
    from .estimate import estimate_saved_bytes

    try:
        return (batch, seq, estimate_saved_bytes(config, batch, seq, "none"),
                estimate_saved_bytes(config, batch, seq, coupling))
    except (AttributeError, TypeError, ValueError, KeyError):
        return None


@dataclass
class TransformSummary:
    """What :func:`transform_dir` found and did."""

    model_dir: str
    out_dir: str
    model_type: str
    coupling: str
    num_layers: int
    converted: list[int]
    refused: list[tuple[int, str]]  # (layer, why it cannot be converted)
    not_selected: list[int]  # convertible, but left out by ``layers``
    params_before: int
    params_added: int
    dtype: str
    files: list[str] = field(default_factory=list)  # everything written to OUT_DIR
    shards: list[str] = field(default_factory=list)  # the weight files among them
    checkpoint_bytes: int = 0
    verify: Any = None  # VerifyReport, or None when not asked
    dry_run: bool = False
    seconds: float = 0.0
    rev: RevModel | None = field(default=None, repr=False)  # the transformed model, on meta
    # estimated bytes saved for backward, (batch, seq, before, after), from the config
    activation_estimate: tuple[int, int, int, int] | None = None

    def lines(self) -> list[str]:
        """The human-readable report, one line each."""
        out = [f"{self.model_dir}: {self.model_type}, {self.num_layers} decoder layers, "
               f"{self.params_before:,} parameters ({self.dtype})"]
        out.append(f"converted {len(self.converted)} of {self.num_layers} layers to "
                   f"{self.coupling} couplings: {_layer_span(self.converted) or '-'}")
        out += [f"  layer {i} not converted: {why}" for i, why in self.refused]
        if self.not_selected:
            out.append(f"  left out by --layers: {_layer_span(self.not_selected)}")
        pct = 100 * self.params_added / max(self.params_before, 1)
        out.append(f"parameters added: {self.params_added:,} ({pct:.2f}%)"
                   + (" (revffn adapters)" if self.params_added else ""))
        if self.activation_estimate is not None:
            b, s, before, after = self.activation_estimate
            out.append(f"activations kept for backward at batch {b} x seq {s} (estimate): "
                       f"{before / 2**30:,.2f} GiB -> {after / 2**30:,.2f} GiB "
                       "(see `revffn plan` for the whole step)")
        if self.verify is not None:
            out.append(f"verify: {self.verify.summary()}")
        if self.dry_run:
            out.append(f"dry run: nothing written (would write {self.out_dir})")
        else:
            weights = [s for s in self.shards if s.endswith(".safetensors")]
            out.append(f"wrote {self.out_dir}: {len(weights)} weight file(s) "
                       f"({self.checkpoint_bytes / 1e6:,.1f} MB), {len(self.files)} files in "
                       f"all, in {self.seconds:.1f}s")
        return out


_SD_DTYPES = {"F64", "F32", "F16", "BF16"}


def _checkpoint_dtype(config: Any, entries: Sequence[_Tensor]) -> torch.dtype:
    """The dtype ``from_pretrained`` picks by default ("auto"): config's, else the weights'."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    first = next((t for t in entries if t.dtype in _SD_DTYPES), None)
    return _DTYPES[first.dtype] if first else torch.get_default_dtype()


def _check_fits(model: torch.nn.Module, entries: Sequence[_Tensor], weights: Path,
                dtype: torch.dtype) -> None:
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
    state = {t.name: torch.empty(t.shape, dtype=_DTYPES.get(t.dtype, dtype), device="meta")
             for t in entries}
    load_config = LoadStateDictConfig(device_map={"": "meta"}, dtype=dtype,
                                      weight_mapping=get_model_conversion_mapping(model))
    with _quiet():
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
    missing = sorted(set(info.missing_keys) - tied)
    if missing:
        raise LoadError(f"{where}: {len(missing)} tensor(s) missing from the checkpoint, "
                        f"e.g. {missing[0]}")
    if info.unexpected_keys:
        names = sorted(info.unexpected_keys)
        raise LoadError(f"{where}: {len(names)} tensor(s) the model does not have, "
                        f"e.g. {names[0]}")


def _meta_model(model_dir: Path, config_path: Path, model_type: str,
                dtype_of: Callable[[Any], torch.dtype]) -> tuple[torch.nn.Module, torch.dtype]:
    """The architecture built from config.json on the meta device, in the load dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with _quiet():
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{config_path}: invalid config: {detail}") from e
    dtype = dtype_of(config)
    try:
        with _quiet(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     **facts_for(model_type).load_kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{config_path}: cannot build a causal LM for model_type "
                        f"{model_type!r}: {detail}") from e
    return model, dtype


def transform_dir(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  coupling: str = "revffn", layers: str | Sequence[int] | None = None,
                  verify: bool = False, force: bool = False, dry_run: bool = False,
                  max_shard_size: int | str = "2GB",
                  progress: Progress | None = None, attention: str = "plain",
                  fixed_point_iters: int | None = None,
                  fixed_point_tol: float | None = None) -> TransformSummary:
    """Transform the checkpoint in ``model_dir`` into a revffn-fx directory ``out_dir``.

    The model is never materialised (meta device; tensors are copied shard by shard), so
    memory stays far below the checkpoint's size. ``progress(done, total, file)`` is called
    before and after each weight shard. ``verify`` loads the written directory and checks
    the generated backward against autograd on a small random batch (needs the memory of
    the model). Every problem raises a one-line :class:`~revffn_fx.errors.RevFFNError`
    (LoadError, ConversionError, ExportError) and leaves no ``out_dir`` behind.
    """
    start = time.perf_counter()
    src, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    limit = parse_size(max_shard_size)
    config_path, model_type = _check_config(src)
    weights, entries = _checkpoint_entries(src)
    _check_out_dir(out, force, src)
    model, dtype = _meta_model(src, config_path, model_type,
                               lambda cfg: _checkpoint_dtype(cfg, entries))
    _check_fits(model, entries, weights, dtype)
    # the cross-branch split needs an example forward, which a meta model cannot run: the
    # structure and adapters do not depend on it, so plan with plain attention here and
    # record the option; rf.load (and --verify) build the cross-branch attention for real
    rev = RevModel(model, coupling, layers, fixed_point_iters=fixed_point_iters,
                   fixed_point_tol=fixed_point_tol)
    if attention != "plain":
        if coupling != "revffn":
            raise ConversionError("cross-branch attention is an option of the revffn coupling")
        if attention != "cross":
            raise ConversionError(f"unknown attention {attention!r}; choose plain or cross")
        rev.attention = attention
    rev.specs(True)  # run every pass now (on meta): a failure must stop us before writing
    n = len(rev.plan.layers)
    wanted = parse_layers(layers, n)
    refused = [(lp.index, lp.reason or "not convertible") for lp in rev.plan.layers
               if not lp.convertible]
    not_selected = [lp.index for lp in rev.plan.layers
                    if lp.convertible and lp.index not in rev.converted and wanted is not None]
    # the adapters are created for real, exactly as RevModel initialises them
    adapters: dict[str, torch.Tensor] = {}
    if rev.coupling == "revffn":
        from .passes.couple import make_adapters

        pdtype = next(model.parameters()).dtype
        for i in rev.converted:
            for k, v in make_adapters(rev.hidden_size, pdtype, "cpu").state_dict().items():
                adapters[f"adapters.{i}.{k}"] = v
    params_before = _count_params(model)
    summary = TransformSummary(
        str(src), str(out), model_type, rev.coupling, n, list(rev.converted), refused,
        not_selected, params_before, sum(v.numel() for v in adapters.values()),
        str(next(model.parameters()).dtype).replace("torch.", ""), dry_run=dry_run, rev=rev,
        activation_estimate=_activation_estimate(model.config, rev.coupling))
    if dry_run:
        summary.seconds = time.perf_counter() - start
        return summary
    with _staging(out, replace=True) as tmp:
        shards = _write_shards(tmp, entries, limit, progress)
        files = list(shards)
        if adapters:
            _write_safetensors(tmp / ADAPTER_FILE, _blob_entries(adapters))
            files.append(ADAPTER_FILE)
        config = json.loads(config_path.read_text())
        section = _section(rev, {k: list(v.shape) for k, v in adapters.items()},
                           next(model.parameters()).dtype, params_before)
        files += _write_meta(tmp, config, section)
        files += _copy_extras(src, tmp)
        if verify:
            summary.verify = _verify_dir(tmp)
        summary.files, summary.shards = files, shards
        summary.checkpoint_bytes = sum(t.nbytes for t in entries)
    summary.seconds = time.perf_counter() - start
    return summary


def _verify_dir(path: Path, batch: int = 2, seq: int = 16, seed: int = 0) -> Any:
    """Load ``path`` for real and run :func:`revffn_fx.verification.verify` on random tokens."""
    from .verification import verify

    rev = load(path)
    vocab = getattr(rev.config, "vocab_size", None) or 128
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    report = verify(rev, ids, seed=seed)
    if not report.ok:
        raise ExportError(f"verify failed, nothing written: {report.summary()}")
    return report


__all__ = ["ADAPTER_FILE", "RevFFNForCausalLM", "TransformSummary", "load", "parse_size", "save",
           "transform_dir"]
