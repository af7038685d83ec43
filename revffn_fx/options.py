"""The transform's options, checked without importing torch (the CLI answers bad input fast).

:class:`TransformOptions` is the one value that carries every knob of the transform: the CLI
builds it, :func:`revffn_fx.transform` builds it from its keyword arguments, the model reads
it, and the export writes it to config.json (:meth:`TransformOptions.to_dict`) and reads it
back (:meth:`TransformOptions.from_dict`), so an option cannot be lost on save and load.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConversionError, RevFFNError

# the couplings, as the passes name them (passes.couple.COUPLINGS, and "none": the exact
# mode); tests check the two lists agree
COUPLINGS = ("revffn", "revnet", "momentum", "meft", "none")
SCALED_COUPLINGS = ("momentum", "meft")  # their inverse divides by the momentum g
DEFAULT_MOMENTUM = 0.125  # passes.couple_momentum.DEFAULT_MOMENTUM
ATTENTIONS = ("plain", "cross")
LOSS_HEADS = ("chunked", "original")
STREAM_DTYPES = ("float64", "float32", "bfloat16", "float16")
# "auto": one step wider than the weights when wide streams pay (calibrated adapters, scaled
# couplings), else the model's own; resolved by TransformOptions.resolved
_WIDER = {"float64": "float64", "float32": "float64", "bfloat16": "float32", "float16": "float32"}


@dataclass(frozen=True)
class TransformOptions:
    """Every option of the transform, checked when built (a ConversionError, one line).

    ``layers``: the decoder layers to convert (None: every convertible one); a spec like
    "0-3,6" or a sequence of indices, kept as a sorted tuple. ``stream_dtype``: a dtype
    name, None (the model's), or "auto" until :meth:`resolved`; a torch dtype is taken by
    its name. ``momentum`` defaults to :data:`DEFAULT_MOMENTUM` for the scaled couplings.
    ``fixed_point_iters`` / ``fixed_point_tol``: None means the default by dtype.
    """

    coupling: str = "revffn"
    layers: tuple[int, ...] | None = None
    attention: str = "plain"
    loss_head: str = "chunked"
    stream_dtype: str | None = None
    checkpoint_rest: bool = False
    fixed_point_iters: int | None = None
    fixed_point_tol: float | None = None
    momentum: float | None = None
    exact_streams: bool = False
    leaf_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:  # frozen: normalise through object
            object.__setattr__(self, name, value)

        if self.coupling not in COUPLINGS:
            raise ConversionError(f"unknown coupling {self.coupling!r}; choose from "
                                  f"{', '.join(COUPLINGS)}")
        put("layers", _layers(self.layers))
        if self.attention not in ATTENTIONS:
            raise ConversionError(f"unknown attention {self.attention!r}; choose plain or cross")
        if self.attention == "cross" and self.coupling != "revffn":
            raise ConversionError("cross-branch attention is an option of the revffn coupling")
        if self.loss_head not in LOSS_HEADS:
            raise ConversionError(f"unknown loss head {self.loss_head!r}; choose chunked or "
                                  "original")
        put("stream_dtype", _stream_dtype(self.stream_dtype))
        put("checkpoint_rest", bool(self.checkpoint_rest))
        put("exact_streams", bool(self.exact_streams))
        it = self.fixed_point_iters
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or it < 1):
            raise ConversionError(f"fixed_point_iters must be a positive integer, not {it!r}")
        tol = self.fixed_point_tol
        if tol is not None:
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) \
                    or not 0 < tol < math.inf:
                raise ConversionError(f"fixed_point_tol must be a positive number, not {tol}")
            put("fixed_point_tol", float(tol))
        put("momentum", _momentum(self.coupling, self.momentum))
        leaf = self.leaf_modules
        if isinstance(leaf, str) or not all(isinstance(m, str) for m in leaf):
            raise ConversionError(f"leaf_modules must be a list of module names, not {leaf!r}")
        put("leaf_modules", tuple(leaf))

    def replace(self, **changes: Any) -> TransformOptions:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def resolved(self, weight_dtype: str, calibrating: bool = False) -> TransformOptions:
        """``stream_dtype="auto"`` decided for weights in ``weight_dtype`` ("float32", ...):
        one step wider when calibrating or for a scaled coupling (their inverse divides by
        g), else the model's own; ``exact_streams`` always streams in float64."""
        dtype = self.stream_dtype
        if dtype == "auto":
            wide = calibrating or self.coupling in SCALED_COUPLINGS
            dtype = _WIDER.get(weight_dtype.replace("torch.", ""), "float32") if wide else None
        if self.exact_streams:  # the fixed-point grid lives in float64
            dtype = "float64"
        return self.replace(stream_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (tuples as lists): what config.json records."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TransformOptions:
        """The options :meth:`to_dict` wrote (fields missing from older files take their
        defaults); an unknown field is refused: it would be silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConversionError(f"unknown transform option {unknown[0]!r} (this revffn-fx "
                                  f"knows {', '.join(sorted(names))})")
        return cls(**dict(data))


def _layers(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(parse_layer_spec(value))
    items = list(value)  # the range is checked against the model (model.parse_layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise ConversionError(f"layers must be layer indices or a spec like '0-3,6', not "
                              f"{value!r}")
    return tuple(sorted(set(items)))


def _stream_dtype(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).replace("torch.", "")  # a torch.dtype prints as torch.float64
    if name not in (*STREAM_DTYPES, "auto"):
        raise ConversionError(f"unknown stream dtype {value!r}; choose from "
                              f"{', '.join(STREAM_DTYPES)}")
    return name


def _momentum(coupling: str, g: Any) -> float | None:
    if coupling not in SCALED_COUPLINGS:
        if g is not None:
            raise ConversionError(f"momentum is an option of the "
                                  f"{' and '.join(SCALED_COUPLINGS)} couplings, not of "
                                  f"{coupling!r}")
        return None
    return DEFAULT_MOMENTUM if g is None else check_momentum(g)


def check_momentum(g: Any) -> float:
    """``g`` as a float in (0, 1), or a ConversionError naming the valid range."""
    try:
        g = float(g)
    except (TypeError, ValueError):
        raise ConversionError(f"momentum must be a number in (0, 1), got {g!r}") from None
    if not 0.0 < g < 1.0:
        raise ConversionError(f"momentum must be in (0, 1) (the fraction of the stream kept "
                              f"by each update; 0 is not invertible), got {g}")
    return g


def parse_layer_spec(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``: the syntax of a layer selection.

    Raises RevFFNError("bad layer spec ...") for anything else: empty parts only, a
    reversed range (``5-2``), negative or non-integer numbers. The range is checked
    against the model later.
    """
    out: set[int] = set()
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    for part in parts:
        lo, sep, hi = part.partition("-")
        ok = lo.strip().isdigit() and (not sep or hi.strip().isdigit())
        if ok and sep and int(lo) > int(hi):
            ok = False
        if not ok:
            break
        out.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
    else:
        if parts:
            return sorted(out)
    raise RevFFNError(f"bad layer spec {spec!r}: use e.g. '0-3,6'")
