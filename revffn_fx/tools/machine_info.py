"""The machine a benchmark ran on, recorded with its results."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, torch/transformers versions, and the GPU when used."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = dict(cpu=cpu, cores=os.cpu_count(),
                                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                                transformers=transformers.__version__,
                                python=platform.python_version())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
