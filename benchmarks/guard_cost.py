"""What the reconstruction guard costs: training-step time with guard="raise" against
guard="off" (same model, alternating, best of N each), and the bytes it keeps per layer
next to one checkpoint boundary.

    python benchmarks/guard_cost.py --json benchmarks/guard_cost.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import revffn_fx as rf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--coupling", default="revnet", help="coupling (default: revnet)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (default: 8)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (default: 256)")
    ap.add_argument("--batch", type=int, default=4, help="sequences (default: 4)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (default: 256)")
    ap.add_argument("--repeats", type=int, default=6, help="steps timed per setting (default: 6)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--json", type=Path, default=None, help="write the result here (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=1024, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=2 * args.hidden,
                        num_local_experts=8, num_experts_per_tok=2,
                        tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    rev = rf.transform(model, coupling=args.coupling).train()
    ids = torch.randint(0, 1024, (args.batch, args.seq))

    def step() -> float:
        t = time.perf_counter()
        rev(ids, labels=ids).loss.backward()
        rev.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    step()
    times: dict[str, list[float]] = {"raise": [], "off": []}
    for _ in range(args.repeats):  # alternate, so load changes hit both alike
        for mode in times:
            rev.options.guard = mode
            times[mode].append(step())
    best = {m: min(v) for m, v in times.items()}
    ratio = best["raise"] / best["off"]
    streams = 2  # the coupling's streams (revnet: two full-width copies)
    kept = args.layers * args.batch * streams * 9 * 8  # WIDTH + norm, float64
    boundary = args.batch * args.seq * args.hidden * 4  # one fp32 checkpoint boundary
    out = {"config": vars(args) | {"json": None}, "best_seconds": best, "ratio": ratio,
           "guard_bytes_per_layer": kept // args.layers, "boundary_bytes": boundary}
    print(f"step with guard {best['raise']:.3f}s, without {best['off']:.3f}s: ratio "
          f"{ratio:.4f}; guard keeps {kept // args.layers} bytes per layer (one fp32 "
          f"checkpoint boundary: {boundary} bytes)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
