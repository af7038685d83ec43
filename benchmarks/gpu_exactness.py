"""The exactness table: each coupling's generated backward against float64 of the same
function, beside plain autograd in the training dtype (the criterion of rf.verify,
revffn_fx.checks.exactness), on a synthetic model with real shapes.

    python benchmarks/gpu_exactness.py --device cuda --dtype bfloat16 --json out.json
    python benchmarks/gpu_exactness.py --device cpu --hidden 64 --layers 2 --seq 32  # smoke

One row per coupling of revffn_fx.options.COUPLINGS (a coupling added there is a row here;
"none" is the exact mode, whose backward is checkpointing): the relative error of all
gradients together of the generated backward (``gen``) and of plain autograd in the same
dtype (``autograd``) against plain autograd of a float64 copy, the criterion's bound, pass or
fail, the worst parameter, and the seconds the check took. Exit status 0 when every coupling
passes, 1 otherwise (the table is printed either way).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="training dtype")
    ap.add_argument("--preset", default="mixtral-shaped",
                    help="step_bench preset (mixtral-shaped, qwen1.5-moe-shaped, ...)")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (narrowed preset)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default: the preset's)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per batch")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--couplings", default=None,
                    help="comma list (default: every coupling of revffn_fx.options.COUPLINGS)")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import torch

    import revffn_fx as rf
    from revffn_fx.checks.exactness import exactness
    from revffn_fx.options import COUPLINGS
    from revffn_fx.tools.bench_models import build_model, preset_config

    dtype = getattr(torch, args.dtype)
    couplings = args.couplings.split(",") if args.couplings else list(COUPLINGS)
    config = preset_config(args.preset, args.layers, args.hidden, args.vocab,
                           max(8192, args.seq))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, int(config.vocab_size), (args.batch, args.seq),
                        generator=gen).to(args.device)
    rows = []
    for c in couplings:
        t0 = time.perf_counter()
        try:
            model = build_model(config, dtype, 0, args.device)
            rev = rf.transform(model, coupling=c).train()
            ex = exactness(rev, ids)
            rows.append(dict(coupling=c, gen=ex.gen, autograd=ex.auto, bound=ex.tol,
                             ok=ex.ok, worst=ex.worst, seconds=time.perf_counter() - t0))
        except Exception as e:  # a row, not the end of the table
            rows.append(dict(coupling=c, error=f"{type(e).__name__}: {e}"[:300],
                             ok=False, seconds=time.perf_counter() - t0))
        finally:
            model = rev = None
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        print(f"  {c}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    dev = (torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu")
    print(f"{args.preset}: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x "
          f"seq {args.seq}, {args.dtype}, {dev}; errors against float64 of the same function")
    print("| coupling | generated backward | autograd in " + args.dtype +
          " | bound | verdict | worst parameter | s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['coupling']} | error: {r['error']} | | | FAILED | | |")
            continue
        print(f"| {r['coupling']} | {r['gen']:.2e} | {r['autograd']:.2e} | {r['bound']:.2e} | "
              f"{'OK' if r['ok'] else 'FAILED'} | {r['worst']} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            preset=args.preset, layers=args.layers, hidden=args.hidden, batch=args.batch,
            seq=args.seq, dtype=args.dtype, device=dev, rows=rows), indent=2) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
