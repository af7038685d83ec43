"""How the exact streams can be held: float64 on the 2**-32 grid (the runtime's grid for
fp32 models) against int64 grid units and int32 units on a coarser 2**-16 grid (the
runtime's for 16-bit models, ``revffn_fx/runtime/grid.py``), for one scaled update
(keep g = 1/8 of the stream, store the 3 dropped bits, add the rounded branch output) and
its inverse. CPU time per element and bytes per element of the two streams.

    python benchmarks/stream_repr.py --json benchmarks/stream_repr.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=4 * 1024 * 512,
                    help="elements per stream (default: 4 x 1024 tokens x 512)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, best kept (default: 5)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, k = args.elements, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g)          # the stream (fp32 values)
    f = torch.randn(n, generator=g) * 0.1    # a branch output (fp32)
    rows = []

    s64 = 2.0 ** 32
    w = torch.round(x.double() * s64) / s64

    def f64() -> None:  # the runtime's: float64 values on the 2**-32 grid
        o = w * s64
        dropped = torch.remainder(o, 8)
        new = ((o - dropped) / 8 + torch.round(f.double() * s64)) / s64
        back = (new * s64 - torch.round(f.double() * s64)) * 8 + dropped
        assert back.numel() == n

    wi = torch.round(x.double() * s64).to(torch.int64)

    def i64() -> None:  # int64 units of 2**-32: shifts and integer adds
        dropped = wi & 7
        add = torch.round(f.double() * s64).to(torch.int64)
        new = (wi >> k) + add
        back = ((new - add) << k) | dropped
        assert back.numel() == n

    s32 = 2.0 ** 16
    wj = torch.round(x * s32).to(torch.int32)

    def i32() -> None:  # int32 units of 2**-16 (|x| < 2**15): half the bytes, coarser grid
        dropped = wj & 7
        add = torch.round(f * s32).to(torch.int32)
        new = (wj >> k) + add
        back = ((new - add) << k) | dropped
        assert back.numel() == n

    for name, fn, nbytes, grid in (("float64, grid 2^-32 (runtime)", f64, 8, 2.0 ** -32),
                                   ("int64 units of 2^-32", i64, 8, 2.0 ** -32),
                                   ("int32 units of 2^-16", i32, 4, 2.0 ** -16)):
        sec = _time(fn, args.repeats)
        rows.append({"representation": name, "ns_per_element": sec / n * 1e9,
                     "stream_bytes_per_element": 2 * nbytes, "grid": grid})
        print(f"{name:32s} {sec / n * 1e9:6.2f} ns/element, {2 * nbytes} bytes/element "
              f"(two streams), grid {grid:.1e}")
    if args.json:
        args.json.write_text(json.dumps({"elements": n, "threads": args.threads,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
