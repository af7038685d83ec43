"""Saved-for-backward bytes of one training forward per coupling, against activation
checkpointing, at two depths; the difference between the depths gives the bytes each
extra decoder layer adds (checkpointing: its layer boundary; exact_streams: the stored
bits). With ``--time``: also the forward + backward time at the larger depth, median of
5 after a warm-up, relative to checkpointing.

fp32 ``mixtral-like`` synthetic model (hidden 256, revffn_fx.tools.bench), batch 4 x seq 256,
lean (chunked) loss head for the couplings:

    python benchmarks/coupling_memory.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import revffn_fx as rf
from revffn_fx.tools.bench_models import build
from revffn_fx.tools.measure_memory import saved_tensor_bytes

MiB = 2**20

METHODS = {
    "checkpoint": None,
    "revffn": dict(coupling="revffn"),
    "revnet": dict(coupling="revnet"),
    "momentum (fp32 streams)": dict(coupling="momentum"),
    "momentum (fp64 streams)": dict(coupling="momentum", stream_dtype="float64"),
    "momentum (exact_streams)": dict(coupling="momentum", stream_dtype="float64",
                                     exact_streams=True),
    "meft (fp64 streams)": dict(coupling="meft", stream_dtype="float64"),
    "meft (exact_streams)": dict(coupling="meft", stream_dtype="float64",
                                 exact_streams=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--depths", default="4,8", help="two depths")
    parser.add_argument("--time", action="store_true", help="also time forward + backward")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d1, d2 = (int(d) for d in args.depths.split(","))
    ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()
    rows: dict[str, list[int]] = {k: [] for k in METHODS}
    times: dict[str, float] = {}

    def timed(fn: object) -> float:
        out = []
        for _ in range(6):
            t0 = time.perf_counter()
            fn().backward()  # type: ignore[operator]
            out.append(time.perf_counter() - t0)
        return statistics.median(out[1:])
    for depth in (d1, d2):
        model = build("mixtral-like", depth)
        hidden = model.config.hidden_size
        for name, kw in METHODS.items():
            if kw is None:
                model.activation_checkpointing_enable({"use_reentrant": False})
                rows[name].append(saved_tensor_bytes(
                    lambda m=model: m(ids, labels=ids).loss)[0])
                if args.time and depth == d2:
                    times[name] = timed(lambda m=model: m(ids, labels=ids).loss)
                model.activation_checkpointing_disable()
                continue
            rev = rf.transform(model, **kw).train()
            rows[name].append(saved_tensor_bytes(lambda r=rev: r(ids, labels=ids).loss)[0])
            if args.time and depth == d2:
                times[name] = timed(lambda r=rev: r(ids, labels=ids).loss)
    print(f"batch {tuple(ids.shape)}, hidden {hidden}: one fp32 hidden state = "
          f"{tokens * hidden * 4 / MiB:.2f} MiB")
    print(f"| method | saved at {d1} layers (MiB) | at {d2} layers | per extra layer "
          "(MiB) | per layer, bytes per token x hidden element |")
    print("|---|---|---|---|---|")
    for name, (a, b) in rows.items():
        per = (b - a) / (d2 - d1)
        print(f"| {name} | {a / MiB:.2f} | {b / MiB:.2f} | {per / MiB:.2f} | "
              f"{per / (tokens * hidden):.2f} |")
    if times:
        print(f"\nforward + backward at {d2} layers, median of 5, / checkpointing:")
        for name, t in times.items():
            print(f"| {name} | {t:.3f} s | {t / times['checkpoint']:.2f} |")


if __name__ == "__main__":
    main()
