"""Peak memory of a whole training step (forward, loss, backward, optimizer step), by
category, for gradient checkpointing and the reversible stack, each with an ordinary
AdamW and with AdamW fused into the backward (revffn_fx.training.fuse_optimizer).

    python benchmarks/fused_peak.py [--layers 8,32,64] [--batch 4] [--seq 256]

The tracker is revffn_fx.tools.measure_memory's TorchDispatchMode over storages (torch's MemTracker
cannot follow modules called from inside a custom backward). Parameters and optimizer
states exist before the measured step (a warm-up step creates the AdamW moments); at every
new peak the gradients alive are summed, and the rest of what the step allocated is
"activations" (saved tensors, recomputation and temporaries).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

import revffn_fx as rf
from revffn_fx.tools.bench_models import build
from revffn_fx.tools.measure_memory import adamw_step_peak

MiB = 2**20


def measure(depth: int, method: str, fused: bool, ids: torch.Tensor) -> dict[str, Any]:
    model = build("mixtral-like", depth)
    if method == "checkpoint":
        model.activation_checkpointing_enable({"use_reentrant": False})
        run: torch.nn.Module = model
    else:
        run = rf.transform(model, coupling=method).train()
    start = time.perf_counter()
    b = adamw_step_peak(run, ids, fused)
    seconds = time.perf_counter() - start
    return {"depth": depth, "method": method, "fused": fused, "peak_MiB": b["peak"] / MiB,
            "params_MiB": b["parameters"] / MiB, "optimizer_MiB": b["optimizer"] / MiB,
            "grads_at_peak_MiB": b["gradients"] / MiB,
            "activations_at_peak_MiB": b["activations"] / MiB, "step_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", default="8,32,64", help="comma list of model depths")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, 1024, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    print("depth | method | fused | peak | params | optimizer | grads@peak | activations@peak"
          " (MiB) | step s")
    for depth in (int(x) for x in args.layers.split(",")):
        for method in ("checkpoint", "revnet", "revffn"):
            for fused in (False, True):
                r = measure(depth, method, fused, ids)
                rows.append(r)
                print(f"{depth} | {method} | {fused} | {r['peak_MiB']:.1f} | {r['params_MiB']:.1f}"
                      f" | {r['optimizer_MiB']:.1f} | {r['grads_at_peak_MiB']:.1f} | "
                      f"{r['activations_at_peak_MiB']:.1f} | {r['step_s']:.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
