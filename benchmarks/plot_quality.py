"""Eval-loss curves of a merged quality JSON (benchmarks/gpu_quality.sh's quality-gpu.json).

    python benchmarks/plot_quality.py docs/quality-gpu-1200.json docs/quality-gpu-1200.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(Path(src).read_text())
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, r in sorted(runs.items()):
        steps, losses = zip(*r["curve"])
        ax.plot(steps, losses, marker=".", label=f"{key} (EM {r['exact_match']:.1f}%)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    device = next(iter(runs.values()))["meta"].get("device", "")
    ax.set_title(f"Fine-tuning tiny-moe-stdlib ({device})")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
