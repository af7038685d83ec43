"""How a d-wide hidden state becomes two streams and back (graph-visible helpers: the
coupling pass inserts them as call_function nodes; nothing here knows torch.fx)."""

from __future__ import annotations

import torch


def split_halves(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """revffn: H = [X1, X2] along features."""
    x1, x2 = h.chunk(2, dim=-1)
    return x1, x2


def merge_halves(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """revffn: [Y1, Y2] back to one d-wide hidden state."""
    return torch.cat((y1, y2), dim=-1)


def split_copies(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """revnet: two full-width copies of H."""
    return h, h


def merge_mean(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """revnet: the two streams merged by their mean where a reversible run ends."""
    return (y1 + y2) * 0.5


def split_momentum(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """momentum: the position stream X = H and a velocity stream V that starts at zero."""
    return h, torch.zeros_like(h)


def merge_first(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """momentum: the position stream is the hidden state (the velocity is dropped)."""
    del v
    return x


def split_copies_last(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """meft: two full-width copies of H (its own function: the inverse generator tells
    the split kinds apart by the function)."""
    return h, h


def merge_last(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
    """meft: the stream written last (the second) is the hidden state."""
    del y1
    return y2


def read_stream(x: torch.Tensor) -> torch.Tensor:
    """The identity: where a branch reads a stream through its own residual adds (bdia's
    whole-layer branch), so those adds are not taken for stream updates."""
    return x


def split_bdia(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bdia: two copies of H, the states before and after a layer (its own function: the
    inverse generator tells the split kinds apart by the function)."""
    return h, h


SPLITS = {"halves": split_halves, "copies": split_copies, "momentum": split_momentum,
          "copies_last": split_copies_last, "bdia": split_bdia}
#: a stack of these kinds ends on the stream its last update wrote (bdia alternates which
#: stream holds the newest state, layer by layer); the merges below serve one layer's graph
WRITTEN_LAST = ("bdia",)
MERGES = {"halves": merge_halves, "copies": merge_mean, "momentum": merge_first,
          "copies_last": merge_last, "bdia": merge_last}
