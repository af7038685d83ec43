"""The reconstruction guard: wrong gradients are never silent.

In the forward, each reversible layer keeps a fingerprint of its input streams: a fixed
random projection of every token to :data:`WIDTH` values, summed over the sequence, per
sample, with the sample's norm (a few numbers per sequence, next to the megabytes of a
checkpoint boundary). In the backward, once the layer's input is reconstructed, the same
fingerprint is taken again; a relative difference beyond the stream dtype's rounding means
the reconstruction went wrong, whatever the cause (a dtype, a compiler that changed the
recompute, a user's pass, an architecture nobody tested), and the layer is named.

Mode: "raise" (default: :class:`~revffn_fx.errors.ReconstructionError`), "warn", "off".
"""

from __future__ import annotations

import warnings

import torch

from ..errors import ReconstructionError

WIDTH = 8  # projected values per stream and sequence
MODES = ("raise", "warn", "off")
_PROJ: dict[tuple[int, torch.dtype, str], torch.Tensor] = {}


def _projection(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (width, dtype, str(device))
    if key not in _PROJ:  # fixed: the same in the forward and the backward, any process
        gen = torch.Generator().manual_seed(0x5EED + width)
        r = torch.randn(width, WIDTH, generator=gen, dtype=torch.float64)
        _PROJ[key] = (r / r.norm(dim=0, keepdim=True)).to(device=device, dtype=dtype)
    return _PROJ[key]


def fingerprint(streams: list[torch.Tensor]) -> torch.Tensor:
    """(samples, streams, WIDTH + 1): each stream's projection summed over its tokens, and
    the stream's norm per sample (float64)."""
    rows = []
    for s in streams:
        with torch.autocast(s.device.type, enabled=False):  # the forward runs under the
            rows.append(_fingerprint(s))  # user's autocast, the backward's guard may not
    return torch.stack(rows, dim=1)


def _fingerprint(s: torch.Tensor) -> torch.Tensor:
    """One stream's rows of :func:`fingerprint`: (samples, WIDTH + 1)."""
    x = s.detach()
    if not x.is_floating_point():  # int32 units (exact streams): their scale is moot
        x = x.float()
    flat = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
    proj = (flat @ _projection(flat.shape[-1], flat.dtype, flat.device)).double().sum(1)
    norm = flat.double().pow(2).sum((1, 2)).sqrt()
    return torch.cat([proj, norm[:, None]], dim=1)


def mismatch(before: torch.Tensor, after: torch.Tensor) -> float:
    """The largest relative difference of two fingerprints (per sample, over the norm of
    the sample's streams; NaN counts as infinite)."""
    # relative to the norm of all streams of the sample together: a stream that starts at
    # zero (momentum's velocity) is judged against the state it belongs to
    scale = before[..., -1].pow(2).sum(1).sqrt()[:, None, None] + 1e-30
    err = ((after - before)[..., :-1].abs() / scale).amax()
    value = float(err)
    return value if value == value else float("inf")


def tolerance(stream_dtype: torch.dtype, compute_dtype: torch.dtype,
              fixed_point_tol: float | None = None) -> float:
    """The difference the guard lets pass: a few roundings of the dtype the branches compute
    in (the reconstructed input is cast to it, so less than that cannot change a gradient:
    8 eps in float32, 2 eps in 16-bit), and at least the square root of the stream dtype's
    rounding; a layer reconstructed by fixed-point iteration also gets 1000x its solver
    tolerance. A correct reconstruction leaves far less; a wrong one, far more."""
    eps = torch.finfo(compute_dtype).eps
    tol = max(torch.finfo(stream_dtype).eps ** 0.5, eps * (2 if eps > 1e-4 else 8))
    if fixed_point_tol is not None:
        tol = max(tol, 1e3 * fixed_point_tol)
    return tol


def check(layer: str, before: torch.Tensor, after: torch.Tensor, tol: float, mode: str,
          hint: str) -> None:
    """Compare a layer's forward fingerprint with its reconstruction's; act by ``mode``."""
    if mode == "off":
        return
    err = mismatch(before, after)
    if err <= tol:
        return
    msg = (f"layer {layer}: the input reconstructed in the backward differs from the forward's "
           f"by {err:.2e} (relative; the stream dtype allows {tol:.1e}), so its gradients "
           f"would be wrong; {hint}")
    if mode == "warn":
        warnings.warn(msg, stacklevel=2)
        return
    raise ReconstructionError(msg)
