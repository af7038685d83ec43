"""Packed side bits: the k low bits a division by g = 2**-k drops, k bits per element.

Stored as k bit planes, each packed eight elements to a byte: k/8 bytes per element (bdia at
gamma 1/2: one bit, 0.125 bytes; at its default 1/16: four bits, 0.5 bytes; momentum at
g = 1/8: three bits, 0.375 bytes per scaled update), against a byte per element unpacked.
"""

from __future__ import annotations

import torch

_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def pack_bits(values: torch.Tensor, k: int) -> torch.Tensor:
    """``values`` (integers in [0, 2**k)) as k packed bit planes, a flat uint8 tensor of
    k * ceil(n / 8) bytes."""
    flat = values.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    w = _WEIGHTS.to(flat.device)
    planes = [(((flat >> b) & 1).view(-1, 8) * w).sum(1) for b in range(k)]
    return torch.cat(planes).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, k: int, shape: torch.Size | tuple[int, ...]
                ) -> torch.Tensor:
    """The integers :func:`pack_bits` packed, as an int32 tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    per_plane = packed.numel() // k
    w = _WEIGHTS.to(packed.device)
    out = torch.zeros(per_plane * 8, dtype=torch.int32, device=packed.device)
    for b in range(k):
        plane = packed[b * per_plane:(b + 1) * per_plane].to(torch.int32)
        bits = (plane[:, None] & w) != 0
        out |= bits.reshape(-1).to(torch.int32) << b
    return out[:n].view(shape)
