"""How deep the momentum / meft inverses stay exact: gradient error of the generated backward
against plain autograd (rf.verify) as depth grows, per momentum g and stream dtype.

The inverse divides by g at every scaled update, so rounding error grows by about 1/g per
residual sublayer (two per decoder layer). fp32 model weights, random ``mixtral-like``
synthetic model (revffn_fx.tools.bench), batch 2 x seq 64:

    python benchmarks/momentum_depth.py
    python benchmarks/momentum_depth.py --depths 2,4,8,16 --momentum 0.125 --streams float64,exact
"""

from __future__ import annotations

import argparse

import torch

import revffn_fx as rf
from revffn_fx.tools.bench_models import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--coupling", default="momentum", help="momentum or meft")
    parser.add_argument("--depths", default="2,4,6,8,12,16", help="decoder layers")
    parser.add_argument("--momentum", default="0.5,0.25,0.125", help="g values")
    parser.add_argument("--streams", default="float32,float64",
                        help="stream dtypes; 'exact' = float64 streams with the lost bits "
                             "stored (exact_streams=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    gs = [float(g) for g in args.momentum.split(",")]
    kinds = args.streams.split(",")
    print(f"{args.coupling}: max relative gradient error vs autograd (fp32 model)")
    print("depth | " + " | ".join(f"g={g:g} {k}" for g in gs for k in kinds))
    for depth in (int(d) for d in args.depths.split(",")):
        model = build("mixtral-like", depth)
        row = []
        for g in gs:
            for kind in kinds:
                kw = ({"stream_dtype": "float64", "exact_streams": True} if kind == "exact"
                      else {"stream_dtype": kind})
                rev = rf.transform(model, coupling=args.coupling, momentum=g, **kw)
                row.append(rf.verify(rev, ids).max_grad_rel_err)
        print(f"{depth} | " + " | ".join(f"{e:.1e}" for e in row), flush=True)


if __name__ == "__main__":
    main()
