"""The exact-streams grid: what the scaled couplings' streams are held in, so that undoing
an update is exact at any depth.

A stream on the grid is an integer number of units of ``2**-bits``. Adding a branch
output rounded to the grid is exact, and keeping g = 2**-k of a stream drops exactly its k
low bits, which the forward stores (runtime/bits.py) for the backward to put back. Two
grids:

- :data:`FLOAT64_GRID` (units of 2**-32, float64 values): the streams of fp32 and fp64
  models; exact while ``|stream| < 2**20``. 8 bytes per element.
- :data:`INT32_GRID` (units of 2**-16, int32 units inside the generated backward): the
  streams of 16-bit models, and of any model given ``stream_dtype="int32"``. 4 bytes per
  element, what a float32 stream costs; branches read the streams as float32. Its range
  is ``|stream| < 2**14``: a training step whose streams leave it is run again with
  float64 values on the same grid (the same numbers, 8 bytes per element, one warning),
  and so is every later step of that stack, so a model with large residual activations
  trains, only without the saving.

The arithmetic is the same integers either way: ``floor(old / 2**k) + round(out *
2**bits)``, in int32 (``>>`` and ``&``) or in float64 (``remainder``), so the reference
run (plain autograd, float64 values) and the generated backward (int32 units) compute the
same function bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .bits import pack_bits, unpack_bits

#: int32 units are kept below this, so a sum of two never wraps
INT_UNITS_LIMIT = 2 ** 30


@dataclass(frozen=True)
class Grid:
    """Streams are integer multiples of ``2**-bits``; ``int_units``: the generated
    backward holds them as int32 units (else as float64 values)."""

    bits: int
    int_units: bool

    @property
    def carrier(self) -> torch.dtype:
        """The float dtype the stack hands its streams to the generated backward in (and
        gets them back in, and their gradients)."""
        return torch.float32 if self.int_units else torch.float64

    @property
    def view_dtype(self) -> torch.dtype | None:
        """The dtype branches read the streams in (None: the streams' own, float64)."""
        return torch.float32 if self.int_units else None

    @property
    def limit(self) -> float:
        """The largest |stream| value the grid holds exactly."""
        return float(2.0 ** (30 - self.bits) if self.int_units else 2.0 ** (52 - self.bits))

    def stored_bytes(self) -> int:
        """Bytes per stream element the generated backward keeps."""
        return 4 if self.int_units else 8


FLOAT64_GRID = Grid(bits=32, int_units=False)
INT32_GRID = Grid(bits=16, int_units=True)


_HALF = (torch.bfloat16, torch.float16)


def choose_grid(stream_dtype: torch.dtype | None, hidden_dtype: torch.dtype,
                device_type: str | None = None) -> Grid:
    """The grid of a stack: int32 when asked (``stream_dtype`` torch.int32) or, unasked,
    when the branches compute in 16 bits (a 16-bit hidden state, or 16-bit autocast on
    ``device_type``: the Trainer's bf16 over fp32 weights); float64 otherwise."""
    if stream_dtype == torch.int32:
        return INT32_GRID
    if stream_dtype is None and (hidden_dtype in _HALF or _autocast_16(device_type)):
        return INT32_GRID
    return FLOAT64_GRID


def _autocast_16(device_type: str | None) -> bool:
    return (device_type is not None and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) in _HALF)


def round_to_grid(streams: list[torch.Tensor], grid: Grid) -> list[torch.Tensor]:
    """Each stream rounded to the grid (gradient 1 through the rounding). In float32 the
    rounding is exact too: ``x * 2**16`` is exact, and a float32 that large is an integer
    already."""
    s = 2.0 ** grid.bits
    out = []
    for x in streams:
        q = torch.round(x.detach() * s) / s
        out.append(q if not x.requires_grad else x + (q - x).detach())
    return out


def to_units(x: torch.Tensor, bits: int, flags: list[torch.Tensor] | None = None
             ) -> torch.Tensor:
    """``round(x * 2**bits)`` as int32; a value out of range is noted in ``flags`` (a
    bool tensor: no device sync here)."""
    v = x.detach()
    if v.dtype != torch.float64:
        v = v.float()  # exact for 16-bit and float32 values
    q = torch.round(v * 2.0 ** bits)
    if flags is not None:
        flags.append((q.abs() >= INT_UNITS_LIMIT).any())
    return q.to(torch.int32)


def check_units(x: torch.Tensor, flags: list[torch.Tensor] | None) -> None:
    """Note in ``flags`` whether int32 units ``x`` left the range."""
    if flags is not None:
        flags.append((x.abs() >= INT_UNITS_LIMIT).any())


def drop_bits(units: torch.Tensor, m: int, lost: list[torch.Tensor] | None) -> torch.Tensor:
    """``floor(units / m)`` for m = 2**k (``>>``); the k bits it drops (``&``, the
    non-negative remainder) packed onto ``lost``."""
    k = m.bit_length() - 1
    if lost is not None:
        lost.append(pack_bits(units & (m - 1), k))
    return units >> k


def put_back_bits(kept: torch.Tensor, m: int, lost: torch.Tensor) -> torch.Tensor:
    """The units :func:`drop_bits` took ``kept`` from, with the bits it stored."""
    return kept * m + unpack_bits(lost, m.bit_length() - 1, kept.shape)


def from_units(q: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """int32 units as values in ``dtype`` (float32: rounded once, as a float64 value
    converted to float32 would be)."""
    return q.to(dtype) * 2.0 ** -bits


def out_of_range(flags: list[torch.Tensor]) -> bool:
    """Whether any flag is set (one device sync)."""
    return bool(torch.stack(flags).any()) if flags else False


def warn_fallback(where: str, grid: Grid) -> None:
    """A stack's streams left the int32 grid's range: the step ran again on float64 values,
    and the stack keeps them from now on (called once per stack)."""
    warnings.warn(
        f"{where}: a residual stream reached |x| >= {grid.limit:g}, beyond the int32 exact "
        "streams' range; the step was run again with float64 streams on the same grid (the "
        "same numbers, 8 bytes per element instead of 4), and this stack keeps float64 "
        "from now on. To start there, pass stream_dtype='float64'", RuntimeWarning,
        stacklevel=3)
