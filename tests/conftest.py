"""Suite-wide settings: one intra-op thread (tiny models run fastest that way on the
2-core CI machine, and parallel BLAS only adds contention), no hub access."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
