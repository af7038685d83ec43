"""bdia's update: the layer before kept with a sign drawn per sample (runtime side).

Streams ``(a, b)`` hold two consecutive states of the residual stream. An update writes
the older one ``w`` from the newer one ``r``::

    w <- gamma * w + (1 + gamma) * L(r) - 2 * gamma * r

with ``L`` the original decoder layer (``L(x) = x + h(x)``) and ``gamma = +-|gamma|`` drawn
per sample in training; ``gamma = 0`` (evaluation) is exactly ``w <- L(r)``, the original
layer. The first update of a stack has no state before it (both streams are copies of its
input): it is ``w <- L(r)`` and its inverse is ``w = r``. With exact streams the
multiplication by gamma = 2**-k drops k bits of ``w`` on the fixed-point grid, which the
forward stores (one small integer per element) and the inverse puts back: reconstruction is
exact at any depth.
"""

from __future__ import annotations

from typing import Any

import torch

from .bits import pack_bits, unpack_bits
from .grid import check_units, drop_bits, put_back_bits, to_units
from .layers import Update


class SampledUpdate(Update):
    """A bdia update (see the module docstring). ``magnitude``: |gamma|."""

    def __init__(self, branch: torch.nn.Module, target: int, reads: list[int],
                 ctx_names: list[str], magnitude: float) -> None:
        super().__init__(branch, target, reads, ctx_names, 1.0)
        self.magnitude = float(magnitude)
        self.gamma: Any = 0.0  # this call's gamma: 0.0, or a (batch, 1, ..., 1) tensor
        self.first_in_stack = False  # set by RevStack.forward
        self.sampling = False  # training: draw gamma (set by RevStack.forward)

    @property
    def scaled(self) -> bool:
        return True

    @property
    def keeps_bits(self) -> bool:
        return self.grid is not None and not _zero(self.gamma)

    @property
    def factor(self) -> Any:
        """What the overwritten stream is multiplied by (the backward scales its gradient)."""
        return self.gamma

    def prepare(self, streams: list[torch.Tensor]) -> Any:
        """Draw this call's gamma (before the branch's RNG state is captured, so the branch
        replays without the draw); returns it for the backward to restore."""
        w = streams[self.target]
        if self.first_in_stack or not self.sampling:
            self.gamma = 0.0
        else:
            sign = torch.randint(0, 2, (w.shape[0],), device=w.device) * 2 - 1
            shape = (w.shape[0],) + (1,) * (w.dim() - 1)
            # in the dtype the update's arithmetic runs in (float32 on the int32 grid,
            # whether the streams are int32 units or float64 values)
            dtype = self.view_dtype or w.dtype
            self.gamma = (sign.to(dtype) * self.magnitude).view(shape)
        return self.gamma

    def restore(self, gamma: Any) -> None:
        self.gamma = gamma

    def run(self, streams: list[torch.Tensor], ctx: dict[str, Any]) -> torch.Tensor:
        """``(1 + gamma) L(r) - 2 gamma r`` in the streams' dtype (the branch itself
        computes in the compute dtype)."""
        r = self.view(streams[self.reads[0]])
        out = super().run(streams, ctx).to(r.dtype)
        if _zero(self.gamma):
            return out
        return (1 + self.gamma) * out - 2 * self.gamma * r

    def combine(self, streams: list[torch.Tensor], out: torch.Tensor,
                lost: list[torch.Tensor] | None = None,
                flags: list[torch.Tensor] | None = None) -> torch.Tensor:
        old = streams[self.target]
        if old.dtype == torch.int32:  # int32 units: the same integers as below
            assert self.grid is not None
            new = to_units(out, self.grid, flags)
            if not _zero(self.gamma):
                kept = drop_bits(old, round(1 / self.magnitude), lost)
                new = new + kept * _sign(self.gamma)
            check_units(new, flags)
            return new
        naive = out if _zero(self.gamma) else self.gamma * old + out
        if self.grid is None:
            return naive
        s = 2.0 ** self.grid
        kept = torch.zeros_like(old)
        if not _zero(self.gamma):
            o = old.detach() * s  # an integer (the stream is on the grid)
            m = round(1 / self.magnitude)
            dropped = torch.remainder(o, m)
            kept = (o - dropped) * self.gamma
            if lost is not None:  # log2(m) bits per element, packed
                lost.append(pack_bits(dropped, m.bit_length() - 1))
        exact = (kept + torch.round(out.detach().to(old.dtype) * s)) / s
        if not naive.requires_grad:
            return exact
        return naive + (exact - naive).detach()

    def invert(self, new: torch.Tensor, out: torch.Tensor, lost: torch.Tensor | None = None,
               streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        if _zero(self.gamma):  # the first update of a stack: both streams were its input
            assert streams is not None
            return streams[self.reads[0]].detach().clone()
        if self.grid is None:
            return (new - out) / self.gamma
        if new.dtype == torch.int32:
            assert lost is not None, "exact streams: the dropped bits were not stored"
            d = (new - to_units(out, self.grid)) * _sign(self.gamma)
            return put_back_bits(d, round(1 / self.magnitude), lost)
        s = 2.0 ** self.grid
        d = (new * s - torch.round(out.detach().to(new.dtype) * s)) / self.gamma
        assert lost is not None, "exact streams: the dropped bits were not stored"
        k = round(1 / self.magnitude).bit_length() - 1
        return (d + unpack_bits(lost, k, d.shape).to(d.dtype)) / s


def _sign(gamma: torch.Tensor) -> torch.Tensor:
    """gamma's sign per sample, as int32 (+1 or -1)."""
    return torch.sign(gamma).to(torch.int32)


def _zero(gamma: Any) -> bool:
    return isinstance(gamma, float) and gamma == 0.0
