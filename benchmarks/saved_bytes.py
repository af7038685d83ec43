"""Saved-for-backward bytes of one training forward, per method, at two depths.

Reproduces the table in docs/architecture.md:  python benchmarks/saved_bytes.py
With the streams carried in fp64 inside the stacks (docs/training.md):
    python benchmarks/saved_bytes.py --stream-dtype float64
"""

from __future__ import annotations

import argparse

import torch

import revffn_fx as rf
from revffn_fx.tools.bench_models import build
from revffn_fx.tools.measure_memory import saved_tensor_bytes

MiB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--stream-dtype", default=None,
                        help="rf.transform(stream_dtype=...); None: the model's dtype")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
    print("depth | none | checkpoint | revffn | revffn+chunked | revnet | revnet+chunked (MiB)")
    for depth in (4, 16):
        model = build("mixtral-like", depth)
        row = {"none": saved_tensor_bytes(lambda m=model: m(ids, labels=ids).loss)[0]}
        for coupling in ("revffn", "revnet"):
            for head in ("original", "chunked"):
                rev = rf.transform(model, coupling=coupling, loss_head=head,
                                   stream_dtype=args.stream_dtype).train()
                key = coupling + ("+chunked" if head == "chunked" else "")
                row[key] = saved_tensor_bytes(lambda r=rev: r(ids, labels=ids).loss)[0]
        model.activation_checkpointing_enable({"use_reentrant": False})
        row["checkpoint"] = saved_tensor_bytes(lambda m=model: m(ids, labels=ids).loss)[0]
        order = ["none", "checkpoint", "revffn", "revffn+chunked", "revnet", "revnet+chunked"]
        print(depth, "|", " | ".join(f"{row[k] / MiB:.2f}" for k in order), flush=True)


if __name__ == "__main__":
    main()
