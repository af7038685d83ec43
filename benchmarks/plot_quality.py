"""Eval-loss curves of a merged quality JSON (benchmarks/gpu_quality.sh's quality-gpu.json).

    python benchmarks/plot_quality.py docs/quality-gpu-1200.json docs/quality-gpu-1200.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot_curves(curves: list[tuple[str, list[tuple[int, float]], float]], path: str | Path,
                title: str) -> None:
    """One eval-loss curve per (label, [(step, loss), ...], exact match %), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, curve, em in curves:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker=".", label=f"{label} (EM {em:.1f}%)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(src: str, dst: str) -> None:
    runs = json.loads(Path(src).read_text())
    device = next(iter(runs.values()))["meta"].get("device", "")
    plot_curves([(key, r["curve"], r["exact_match"]) for key, r in sorted(runs.items())], dst,
                f"Fine-tuning tiny-moe-stdlib ({device})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="merged quality JSON (e.g. docs/quality-gpu-1200.json)")
    parser.add_argument("dst", help="PNG to write")
    args = parser.parse_args()
    main(args.src, args.dst)
