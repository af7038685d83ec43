"""Two CPU ranks on gloo for the distributed tests: start a rank, spawn the workers, and read
back what each rank wrote (starting processes dominates these tests' cost, so each spawn
measures many cases and the tests assert on the results)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def start_rank(rank: int, tmp: str, world: int) -> Any:
    """In a spawned worker: one thread, the tests folder importable, the process group up;
    returns a 1-D CPU device mesh over the ranks."""
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    return init_device_mesh("cpu", (world,))


def spawn(worker: Callable[[int, str], None], tmp: Path, world: int,
          name: str) -> list[dict[str, Any]]:
    """Run ``worker(rank, tmp)`` on ``world`` processes; each writes ``<name><rank>.json``
    into ``tmp``; returns them in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(str(tmp),), nprocs=world, join=True)
    return [json.loads(Path(tmp, f"{name}{r}.json").read_text()) for r in range(world)]
