"""How a d-wide hidden state becomes two streams and back (graph-visible helpers)."""

from __future__ import annotations

import torch
import torch.fx as fx


@fx.wrap
def split_halves(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """revffn: H = [X1, X2] along features."""
    x1, x2 = h.chunk(2, dim=-1)
    return x1, x2


@fx.wrap
def merge_halves(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """revffn: [Y1, Y2] back to one d-wide hidden state."""
    return torch.cat((y1, y2), dim=-1)


@fx.wrap
def split_copies(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """revnet: two full-width copies of H."""
    return h, h


@fx.wrap
def merge_mean(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """revnet: the two streams merged by their mean where a reversible run ends."""
    return (y1 + y2) * 0.5


SPLITS = {"halves": split_halves, "copies": split_copies}
MERGES = {"halves": merge_halves, "copies": merge_mean}
