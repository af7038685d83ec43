"""Where reversibility pays (issue 30): long sequences and deep stacks, each coupling against
the exact mode and its offloading peer, whole-step peaks on the CPU.

    python benchmarks/long_context.py sweep --layers 16 --seqs 1024,2048,4096,8192,16384
    python benchmarks/long_context.py floor --seq 16384   # one layer's recompute working set
    python benchmarks/long_context.py plot                # benchmarks/long_context/sweep.png
    python benchmarks/long_context.py report              # the Markdown of docs/benchmarks.md

Model: Mixtral-shaped (``revffn_fx.tools.bench_models.preset_config``) narrowed to ``--hidden``
(512: intermediate 1792, 4 heads of 128, 1 KV head, 8 experts top-2, vocab 32000), fp32,
batch 1, random weights. Each method runs in its own process (peak RSS); one measured step
after a short warm-up step (``--warmup-seq``: it only creates the AdamW states) gives
MemTracker's peak by category, the peak RSS and the step's CPU time (one thread). Methods:
``revffn_fx.tools.step_methods.LONG_METHODS``: the exact mode, the offloading peer and
every coupling of ``revffn_fx.options.COUPLINGS`` (a coupling added there is measured
here). Results:
``benchmarks/long_context/L{layers}_s{seq}.json``. Run with OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

OUT = Path(__file__).resolve().parent / "long_context"
MiB = 2 ** 20


def _config(layers: int, hidden: int, vocab: int | None, seq: int):  # noqa: ANN202
    from revffn_fx.tools.bench_models import preset_config

    return preset_config("mixtral-shaped", layers, hidden, vocab, max(8192, seq))


def _progress(done: int, total: int, what: str) -> None:
    print(f"  {done}/{total} {what}", file=sys.stderr, flush=True)


def sweep(args: argparse.Namespace) -> None:
    import torch

    from revffn_fx.tools.step_bench import run_step_bench
    from revffn_fx.tools.step_methods import LONG_METHODS

    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else list(LONG_METHODS)
    OUT.mkdir(exist_ok=True)
    for layers in [int(v) for v in args.layers.split(",")]:
        for seq in [int(v) for v in args.seqs.split(",")]:
            path = OUT / f"L{layers}_s{seq}.json"
            done = {}
            if path.exists() and not args.force:  # add the methods not measured yet
                done = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
            todo = [m for m in methods if m not in done or done[m].get("error")]
            if not todo:
                continue
            print(f"== {layers} layers x {seq} tokens: {', '.join(todo)}", flush=True)
            config = _config(layers, args.hidden, args.vocab, seq)
            for m in todo:  # saved after each method: a long point survives an interruption
                res = run_step_bench(config, 1, seq, [m], repeats=0, isolate=True,
                                     label="mixtral-shaped", progress=_progress,
                                     warmup_seq=args.warmup_seq, one_step=True)
                data = asdict(res)
                if path.exists():  # another sweep may have added methods meanwhile
                    done.update({r["method"]: r for r in json.loads(path.read_text())["rows"]
                                 if r["method"] not in done})
                done[m] = data["rows"][0]
                data["rows"] = list(done.values())  # ratios: computed by the report
                (OUT / "rows").mkdir(exist_ok=True)  # each row on its own too
                (OUT / "rows" / f"L{layers}_s{seq}_{m.replace('/', '-')}.json").write_text(
                    json.dumps(done[m], indent=2) + "\n")
                path.write_text(json.dumps(data, indent=2) + "\n")
                print(res.to_markdown().splitlines()[-1], flush=True)


def floor(args: argparse.Namespace) -> None:
    """What one layer's recompute holds at its peak: each sublayer (attention, MoE) run
    forward and backward with gradients, as the generated backward (or checkpointing)
    recomputes it: the peak of the tensors it creates (measure_memory.peak_live_bytes),
    parameters frozen so no weight gradient is counted; and the MoE recomputed in token
    chunks, one chunk's forward and backward after the other."""
    import torch

    from revffn_fx.tools.bench_models import build_model
    from revffn_fx.tools.measure_memory import peak_live_bytes

    torch.set_num_threads(1)
    rows = []
    for seq in [int(v) for v in args.seqs.split(",")]:
        config = _config(1, args.hidden, 512, seq)
        model = build_model(config)
        layer = model.model.layers[0]
        x = torch.randn(1, seq, args.hidden)
        pos = torch.arange(seq)[None]
        pe = model.model.rotary_emb(x, pos)
        def attention(h, layer=layer, pe=pe):  # noqa: ANN001, ANN202
            return layer.self_attn(layer.input_layernorm(h), position_embeddings=pe,
                                   attention_mask=None)[0]

        def moe(h, layer=layer):  # noqa: ANN001, ANN202
            return layer.mlp(layer.post_attention_layernorm(h))

        def moe_chunked(h, layer=layer, chunks=args.chunks):  # noqa: ANN001, ANN202
            # what a generated backward that recomputes the token-local MoE branch chunk by
            # chunk would hold: each chunk's forward and backward, one after the other
            for piece in h.split(-(-h.shape[1] // chunks), dim=1):
                out = layer.mlp(layer.post_attention_layernorm(piece))
                out.backward(torch.ones_like(out))
            return None

        parts = {"attention": attention, "moe": moe,
                 f"moe in {args.chunks} token chunks": moe_chunked}
        for q in layer.parameters():  # the activation working set only (no weight grads)
            q.requires_grad_(False)
        for name, fn in parts.items():
            h = x.clone().requires_grad_(True)

            def run(fn=fn, h=h):  # noqa: ANN001, ANN202
                out = fn(h)
                out = out[0] if isinstance(out, tuple) else out
                if out is not None:
                    out.backward(torch.ones_like(out))

            act, _ = peak_live_bytes(run)
            td = seq * args.hidden * 4
            rows.append(dict(seq=seq, part=name, working_set_bytes=act,
                             hidden_state_bytes=td))
            print(f"seq {seq} {name}: {act / MiB:,.0f} MiB = {act / td:.1f} x the hidden "
                  f"state ({td / MiB:,.0f} MiB)", flush=True)
            del h
    OUT.mkdir(exist_ok=True)
    (OUT / "floor.json").write_text(json.dumps(dict(hidden=args.hidden, rows=rows),
                                               indent=2) + "\n")


def _points() -> list[dict]:
    out = []
    for path in sorted(OUT.glob("L*_s*.json")):
        d = json.loads(path.read_text())
        out.append(d)
    return sorted(out, key=lambda d: (d["layers"], d["seq"]))


def _row(d: dict, m: str) -> dict | None:
    return next((r for r in d["rows"] if r["method"] == m and not r.get("error")), None)


def _act_rss(r: dict) -> int | None:
    """The activation part by RSS: peak RSS minus MemTracker's params, grads, optimizer
    states at its peak (allocator and runtime overheads stay in it)."""
    if r.get("rss_peak_bytes") is None:
        return None
    return r["rss_peak_bytes"] - r["parameters"] - r["gradients"] - r["optimizer"]


def report(args: argparse.Namespace) -> None:
    from revffn_fx.tools.step_methods import LONG_METHODS

    points = _points()
    methods = [m for m in dict.fromkeys([*LONG_METHODS, "offload/unpinned"])
               if any(_row(d, m) for d in points)]
    print("| layers x tokens | method | peak MiB | /exact | RSS MiB | /exact | activ. MiB | "
          "/exact | activ. by RSS MiB | CPU s | /exact | plan MiB | plan/peak | "
          "plan activ./activ. |")
    print("|" + "---|" * 14)
    for d in points:
        ref = _row(d, "exact")
        plan = _plan(d)
        for m in methods:
            r = _row(d, m)
            if r is None:
                continue

            def x(a: float | None, b: float | None) -> str:
                return "-" if a is None or not b else f"{a / b:.3f}"

            p, pa = plan.get(m, (None, None))
            cells = [f"{d['layers']} x {d['seq']}", m, f"{r['peak_bytes'] / MiB:,.0f}",
                     x(r["peak_bytes"], ref and ref["peak_bytes"]),
                     "-" if r["rss_peak_bytes"] is None else f"{r['rss_peak_bytes'] / MiB:,.0f}",
                     x(r["rss_peak_bytes"], ref and ref["rss_peak_bytes"]),
                     f"{r['activations'] / MiB:,.0f}",
                     x(r["activations"], ref and ref["activations"]),
                     "-" if _act_rss(r) is None else f"{_act_rss(r) / MiB:,.0f}",
                     "-" if r["cpu_s"] is None else f"{r['cpu_s']:.0f}",
                     x(r["cpu_s"], ref and ref["cpu_s"]),
                     "-" if p is None else f"{p / MiB:,.0f}",
                     x(p, r["peak_bytes"]), x(pa, r["activations"])]
            print("| " + " | ".join(cells) + " |")
    print()
    print(crossovers(points, methods))
    print()
    print(plan_crossovers(points[0]["hidden"] if points else args.hidden,
                          points[0]["vocab"] if points else args.vocab,
                          [m for m in LONG_METHODS if m != "exact"]))


def _plan(d: dict) -> dict[str, tuple[int, int]]:
    """The planned whole-step peak of each measured method at this point, and its
    activation part (activations + loss head)."""
    from revffn_fx.tools.memory_plan import plan_for_step_method

    config = _config(d["layers"], d["hidden"], d["vocab"], d["seq"])
    out = {}
    for r in d["rows"]:
        try:
            row = plan_for_step_method(config, d["batch"], d["seq"], r["method"])
            out[r["method"]] = (row.total + row.host,  # on the CPU the host is the same memory
                                row.activations + row.loss_head + row.host)
        except KeyError:
            pass
    return out


def crossovers(points: list[dict], methods: list[str]) -> str:
    """Per depth and method: the smallest measured token count from which the method's
    whole-step peak (and its activation part) stays below the exact mode's."""
    lines = ["| layers | method | peak below exact from | activation part below exact from |",
             "|---|---|---|---|"]
    for layers in sorted({d["layers"] for d in points}):
        ds = [d for d in points if d["layers"] == layers]
        for m in methods:
            if m == "exact":
                continue
            cells = []
            for key in ("peak_bytes", "activations"):
                pts = [(d["seq"], r[key] < e[key]) for d in ds
                       if (r := _row(d, m)) and (e := _row(d, "exact"))]
                if not pts:
                    cells.append("-")
                    continue
                first = next((s for k, (s, _) in enumerate(pts)
                              if all(b for _, b in pts[k:])), None)
                cells.append(f"never (up to {pts[-1][0]})" if first is None else
                             f"{first} tokens" + (" (all measured)" if first == pts[0][0]
                                                  else ""))
            lines.append(f"| {layers} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_crossovers(hidden: int, vocab: int | None, methods: list[str],
                    depths: tuple[int, ...] = (16, 32, 48)) -> str:
    """The same question asked of ``revffn plan`` (validated on the measured points): per
    depth, the token count (powers of two, 512 to 128k) from which each method's planned
    whole-step peak stays below the exact mode's, and their ratio at 16k and 64k tokens.
    On the CPU offloading is no gain; the offload row is the device figure of a GPU."""
    from revffn_fx.tools.memory_plan import plan_for_step_method

    seqs = [2 ** k for k in range(9, 18)]
    lines = ["| layers | method | planned peak below exact from | /exact at 16k | "
             "/exact at 64k | activation part /exact at 16k |", "|---|---|---|---|---|---|"]
    for layers in depths:
        config = _config(layers, hidden, vocab, max(seqs))
        exact = {s: plan_for_step_method(config, 1, s, "exact") for s in seqs}
        for m in methods:
            rows = {s: plan_for_step_method(config, 1, s, m) for s in seqs}
            below = [rows[s].total < exact[s].total for s in seqs]
            first = next((s for k, s in enumerate(seqs) if all(below[k:])), None)

            def act(r):  # noqa: ANN001, ANN202
                return r.activations + r.loss_head

            k16, k64 = 2 ** 14, 2 ** 16
            lines.append(
                f"| {layers} | {m} | {'never (to 128k)' if first is None else first} | "
                f"{rows[k16].total / exact[k16].total:.3f} | "
                f"{rows[k64].total / exact[k64].total:.3f} | "
                f"{act(rows[k16]) / act(exact[k16]):.3f} |")
    return "\n".join(lines)


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from revffn_fx.tools.step_methods import LONG_METHODS

    points = _points()
    depths = sorted({d["layers"] for d in points})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for layers, style in zip(depths, ("-", "--", ":")):
        ds = [d for d in points if d["layers"] == layers]
        for i, m in enumerate(LONG_METHODS):
            for ax, key in ((axes[0], "activations"), (axes[1], "peak_bytes")):
                pts = [(d["seq"], r[key] / MiB) for d in ds if (r := _row(d, m))]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{i}",
                            label=f"{m}, {layers} layers" if len(depths) > 1 else m)
    for ax, title in ((axes[0], "activation part of the peak (peak - params, grads, optimizer)"),
                      (axes[1], "whole-step peak (MemTracker)")):
        ax.set_xscale("log", base=2)
        if ax is axes[0]:
            ax.set_yscale("log", base=2)
        ax.set_xlabel("tokens per step (batch 1)")
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        xs = sorted({d["seq"] for d in points})
        ax.set_xticks(xs, [str(v) for v in xs])
    axes[0].legend(fontsize=7)
    d0 = points[0]
    fig.suptitle(f"Mixtral-shaped, hidden {d0['hidden']}, vocab {d0['vocab']}, fp32, CPU",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / "sweep.png", dpi=110)
    print(OUT / "sweep.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("part", choices=["sweep", "floor", "plot", "report"],
                    help="sweep: measure; floor: one layer's recompute working set; plot, "
                         "report: render what was measured")
    ap.add_argument("--layers", default="16", help="sweep: comma list of depths")
    ap.add_argument("--seqs", default="4096,8192,16384", help="comma list of tokens per step")
    ap.add_argument("--hidden", type=int, default=512, help="hidden size of the preset")
    ap.add_argument("--vocab", type=int, default=None, help="default: the preset's 32000")
    ap.add_argument("--methods", default=None, help="default: tools/step_methods.LONG_METHODS")
    ap.add_argument("--warmup-seq", type=int, default=64,
                    help="tokens of the warm-up step (it only creates the AdamW states)")
    ap.add_argument("--force", action="store_true", help="measure again what is there")
    ap.add_argument("--chunks", type=int, default=8,
                    help="floor: token chunks of the chunked MoE recompute")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    {"sweep": sweep, "floor": floor, "plot": plot, "report": report}[args.part](args)


if __name__ == "__main__":
    main()
