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

from . import couplings
from .couplings.base import power_of_two_fraction
from .couplings.momentum import DEFAULT_MOMENTUM as DEFAULT_MOMENTUM  # the default g
from .errors import ConversionError, RevFFNError

# the couplings, from the registry (revffn_fx.couplings)
COUPLINGS = couplings.NAMES
SCALED_COUPLINGS = tuple(n for n, c in couplings.REGISTRY.items() if c.scaled)  # divide by g
#: every coupling-specific option, and the couplings that take it
_COUPLING_OPTIONS = {name: tuple(c.name for c in couplings.REGISTRY.values() if name in c.options)
                     for c in couplings.REGISTRY.values() for name in c.options}
ATTENTIONS = ("plain", "cross")
GUARDS = ("raise", "warn", "off")  # the reconstruction guard (runtime/guard.py)
LOSS_HEADS = ("chunked", "original")
STREAM_DTYPES = ("float64", "float32", "int32")
# The stream rule (one rule, the API's and the CLI's): unless a stream dtype is given, the
# coupled streams are carried one step wider than the hidden state they come from, decided
# at run time (bf16/fp16 -> fp32, fp32 -> fp64), so the backward's reconstruction rounds no
# worse than autograd does; the scaled couplings' inverse divides by g, which no float width
# survives at depth, so they default to exact streams (a fixed-point grid, dropped bits kept).
# 16-bit streams are refused: measured on the shipped model in bf16, gradient error 0.18
# (revffn) to 0.80 (momentum) against 0.004-0.035 for autograd (docs/quality.md, Exactness).
_NARROW_STREAMS = ("bfloat16", "float16")
#: the largest amplification of stream rounding a scaled coupling without exact streams may
#: reach, (1/g) ** (scaled updates) * eps(stream dtype): beyond it the backward is worse
#: than autograd (refused, naming exact_streams=True)
MAX_AMPLIFIED_ROUNDING = 1e-6
#: exact streams keep the bits a scale g = 2**-k drops; k up to 16 (stored in a byte up to
#: k = 8, else in an int32)
MAX_MOMENTUM_BITS = 16


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
    bdia_gamma: float | None = None
    exact_streams: bool | None = None
    leaf_modules: tuple[str, ...] = ()
    guard: str = "raise"
    token_chunk: int = 4096

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:  # frozen: normalise through object
            object.__setattr__(self, name, value)

        coupling = couplings.get(self.coupling)  # unknown: a ConversionError
        put("layers", _layers(self.layers))
        if self.attention not in ATTENTIONS:
            raise ConversionError(f"unknown attention {self.attention!r}; choose plain or cross")
        if self.attention == "cross" and not coupling.cross_attention:
            raise ConversionError("cross-branch attention is an option of the revffn coupling")
        if self.loss_head not in LOSS_HEADS:
            raise ConversionError(f"unknown loss head {self.loss_head!r}; choose chunked or "
                                  "original")
        put("stream_dtype", _stream_dtype(self.stream_dtype))
        put("checkpoint_rest", bool(self.checkpoint_rest))
        # None: the rule decides (exact for the scaled couplings, whose inverse divides;
        # int32 streams are exact streams: a grid of integer units)
        int_streams = self.stream_dtype == "int32"
        put("exact_streams", (self.coupling in SCALED_COUPLINGS or int_streams)
            if self.exact_streams is None else bool(self.exact_streams))
        if int_streams and not self.exact_streams:
            raise ConversionError("stream_dtype 'int32' is the exact streams' grid (integer "
                                  "units of 2**-16): it needs exact_streams (leave it unset)")
        it = self.fixed_point_iters
        if it is not None and (isinstance(it, bool) or not isinstance(it, int) or it < 1):
            raise ConversionError(f"fixed_point_iters must be a positive integer, not {it!r}")
        tol = self.fixed_point_tol
        if tol is not None:
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) \
                    or not 0 < tol < math.inf:
                raise ConversionError(f"fixed_point_tol must be a positive number, not {tol}")
            put("fixed_point_tol", float(tol))
        for name, takers in _COUPLING_OPTIONS.items():
            put(name, _coupling_option(coupling, name, getattr(self, name), takers,
                                       self.exact_streams))
        chunk = self.token_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ConversionError(f"token_chunk must be a number of tokens >= 0 (0: never "
                                  f"chunk), not {chunk!r}")
        if self.guard not in GUARDS:
            raise ConversionError(f"unknown guard {self.guard!r}; choose from "
                                  f"{', '.join(GUARDS)}")
        leaf = self.leaf_modules
        if isinstance(leaf, str) or not all(isinstance(m, str) for m in leaf):
            raise ConversionError(f"leaf_modules must be a list of module names, not {leaf!r}")
        put("leaf_modules", tuple(leaf))

    @classmethod
    def build(cls, **options: Any) -> TransformOptions:
        """The options from keywords; an unknown keyword is a ConversionError naming the
        known ones (not a TypeError)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConversionError(f"unknown option {unknown[0]!r}; the transform takes "
                                  f"{', '.join(sorted(names))}")
        return cls(**options)

    def replace(self, **changes: Any) -> TransformOptions:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)

    def resolved(self, weight_dtype: str, calibrating: bool = False) -> TransformOptions:
        """The options with a stream dtype a run can be judged by: ``exact_streams`` keep
        a grid (runtime/grid.py: unset, the run-time rule picks int32 units for 16-bit
        hidden states and float64 values for fp32; "int32" or "float64" as asked; a float32
        request gets float64, the narrowest float the grid is exact in); calibrated adapters
        (large gains) get float64 streams over fp32 weights; otherwise the stream dtype
        stays unset (the run-time rule: one step wider than the hidden state)."""
        dtype = self.stream_dtype
        if self.exact_streams and dtype == "float32":
            dtype = "float64"
        elif calibrating and dtype is None:
            dtype = "float64" if weight_dtype.replace("torch.", "") in ("float32",
                                                                          "float64") else None
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
    """A stream dtype name, or None for the run-time rule ("auto" is the same)."""
    if value is None:
        return None
    name = str(value).replace("torch.", "")  # a torch.dtype prints as torch.float64
    if name == "auto":
        return None
    if name in _NARROW_STREAMS:
        raise ConversionError(
            f"stream dtype {name} is refused: 16-bit streams make the backward's "
            "reconstruction lose what autograd keeps (gradient error 0.18-0.80 against "
            "autograd's 0.004-0.035 on the shipped model); leave stream_dtype unset (one "
            "step wider than the model: float32 for 16-bit weights) or pass 'float32'")
    if name not in STREAM_DTYPES:
        raise ConversionError(f"unknown stream dtype {value!r}; choose from "
                              f"{', '.join(STREAM_DTYPES)} (or leave it unset)")
    return name


def _coupling_option(coupling: couplings.Coupling, name: str, value: Any,
                     takers: tuple[str, ...], exact: bool) -> float | None:
    """A coupling's own option (momentum, bdia_gamma): refused on other couplings,
    defaulted and checked on its own; with exact streams a scale must be 2**-k."""
    if name not in coupling.options:
        if value is not None:
            raise ConversionError(f"{name} is an option of the {' and '.join(takers)} "
                                  f"coupling{'s' if len(takers) > 1 else ''}, not of "
                                  f"{coupling.name!r}")
        return None
    default, check = coupling.options[name]
    g = default if value is None else check(value)
    if exact:
        k = -math.log2(g)
        if k != round(k) or k > MAX_MOMENTUM_BITS:
            near = 2.0 ** -min(MAX_MOMENTUM_BITS, max(1, round(k)))
            raise ConversionError(
                f"{name} {g} cannot be inverted exactly: exact streams (the default of "
                f"{coupling.name}) need g = 2**-k with k in 1..{MAX_MOMENTUM_BITS} (0.5, "
                f"0.25, 0.125, ...); use {name}={near:g}")
    return g


def check_amplification(coupling: str, g: float, scaled_updates: int,
                        stream_dtype: str) -> None:
    """Refuse a scaled coupling on float streams whose inverse would amplify rounding
    beyond :data:`MAX_AMPLIFIED_ROUNDING` over ``scaled_updates`` divisions by ``g``."""
    eps = {"float64": 2.0 ** -53, "float32": 2.0 ** -24}.get(stream_dtype, 2.0 ** -8)
    amp = (1.0 / g) ** scaled_updates
    if amp * eps > MAX_AMPLIFIED_ROUNDING:
        raise ConversionError(
            f"{coupling} with momentum {g:g} on {stream_dtype} streams without exact streams "
            f"amplifies rounding by (1/{g:g})^{scaled_updates} = {amp:.1e} over "
            f"{scaled_updates} scaled updates (relative error ~{amp * eps:.0e}): the backward "
            "would be less exact than autograd; use exact_streams=True (the default)")


def check_momentum(g: Any) -> float:
    """``g`` as a float in (0, 1), or a ConversionError naming the valid range."""
    return power_of_two_fraction("momentum")(g)


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
