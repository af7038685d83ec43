"""Peak memory of a whole training step (forward, loss, backward, optimizer step), by
category, for gradient checkpointing and the reversible stack, each with an ordinary
AdamW and with AdamW fused into the backward (revffn_fx.training.fuse_optimizer).

    python benchmarks/fused_peak.py [--layers 8,32,64] [--batch 4] [--seq 256]

The tracker is revffn_fx.memory's TorchDispatchMode over storages (torch's MemTracker
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
from transformers import AutoModelForCausalLM, MixtralConfig

import revffn_fx as rf
from revffn_fx.memory import step_breakdown
from revffn_fx.training import fuse_optimizer

MiB = 2**20


def mixtral_like(depth: int) -> torch.nn.Module:
    cfg = MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=depth, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train()


def measure(depth: int, method: str, fused: bool, ids: torch.Tensor) -> dict[str, float]:
    model = mixtral_like(depth)
    if method == "checkpoint":
        model.activation_checkpointing_enable({"use_reentrant": False})
        run = model
    else:
        run = rf.transform(model, coupling=method).train()
    params = [p for p in run.parameters() if p.requires_grad]
    if fused:
        opt: Any = fuse_optimizer(run, torch.optim.AdamW, lr=1e-5)
        states = lambda: [t for o in opt.optimizers.values()  # noqa: E731
                          for s in o.state.values() for t in s.values()]
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
        states = lambda: [t for s in opt.state.values() for t in s.values()]  # noqa: E731

    def step() -> None:
        run(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates the optimizer states
    start = time.perf_counter()
    b = step_breakdown(step, params, states())
    seconds = time.perf_counter() - start
    return {"depth": depth, "method": method, "fused": fused, "peak_MiB": b["peak"] / MiB,
            "params_MiB": b["parameters"] / MiB, "optimizer_MiB": b["optimizer"] / MiB,
            "grads_at_peak_MiB": b["gradients"] / MiB,
            "activations_at_peak_MiB": b["activations"] / MiB, "step_s": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="8,32,64")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--json", default=None)
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
