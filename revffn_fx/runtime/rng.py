"""Record and replay random number generator state, so a recomputed branch draws the same
dropout masks, router jitter and sampled routes as the forward did."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class RNGState:
    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]


def capture(devices: list[int]) -> RNGState:
    """The current CPU state and that of each listed CUDA device."""
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices}
    return RNGState(torch.get_rng_state(), cuda)


@contextmanager
def replay(state: RNGState) -> Iterator[None]:
    """Run the body from ``state``; the global RNG is left as it was before."""
    with torch.random.fork_rng(devices=list(state.cuda), enabled=True):
        torch.set_rng_state(state.cpu)
        for d, s in state.cuda.items():
            torch.cuda.set_rng_state(s, d)
        yield


def cuda_devices(tensors: list[torch.Tensor]) -> list[int]:
    """CUDA devices the given tensors live on (their RNGs are the ones kernels use)."""
    return sorted({t.device.index or 0 for t in tensors if t.is_cuda})
