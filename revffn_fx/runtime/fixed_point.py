"""Fixed-point reconstruction of an update that reads the stream it writes (cross-branch
attention), with its one default rule: the iteration budget and the relative residual to
reach both follow the dtype the branches compute in.

One solver, :func:`fixed_point`, for every reconstruction: the training backward
(:mod:`.function`, budget and tolerance from ``RuntimeOptions``, which the transform sets
from this rule or the user's values), the transform's convergence probe, and rf.verify's
round trip.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .layers import Update

# default relative residual of a fixed-point reconstruction, by the dtype branches compute
# in: near its rounding level (fp64's 1e-11 takes more steps of a slow contraction)
FIXED_POINT_TOL = {torch.float64: 1e-11, torch.float32: 1e-6, torch.bfloat16: 1e-2,
                   torch.float16: 1e-2}


def fixed_point(u: Update, y: list[torch.Tensor], ctx: dict[str, Any], iters: int,
                tol: float) -> tuple[torch.Tensor, int, float]:
    """Solve ``x = (y_t - f(..., x, ...)) / scale`` for the stream ``u`` updates (it reads
    itself).

    Starts at ``x = y_t``; returns (x, iterations, final relative residual). Stops early
    when the residual is not finite (diverged): further steps cannot help.
    """
    t = u.target
    x = y[t]
    residual = float("inf")
    for i in range(1, iters + 1):
        streams = list(y)
        streams[t] = x
        new = u.invert(y[t], u.run(streams, ctx))
        # in float64: exact streams on the int32 grid are integer units
        residual = float((new - x).double().norm() / x.double().norm().clamp_min(1e-30))
        x = new
        if residual <= tol or not math.isfinite(residual):
            return x, i, residual
    return x, iters, residual


def fixed_point_tolerance(dtype: torch.dtype) -> float:
    """The relative residual a fixed-point reconstruction iterates to by default: near the
    rounding level of ``dtype`` (1e-11 in fp64, 1e-6 in fp32, 1e-2 in 16-bit)."""
    return FIXED_POINT_TOL.get(dtype, 1e-2)


def fixed_point_iters(dtype: torch.dtype) -> int:
    """The most iterations by default: 200 in fp64 (its tighter tolerance), else 50."""
    return 200 if dtype == torch.float64 else 50
