"""The headline of docs/benchmarks.md: the peak of a whole training step (forward, loss,
backward, AdamW step after a warm-up step), each method against SFT + HF checkpointing.

    python benchmarks/headline.py main     # mixtral-shaped, hidden 256, 8 layers, 4 x 1024,
                                           #   every method, each in its own process (RSS)
    python benchmarks/headline.py depth --batch 2 --seq 512   # ckpt / exact / revffn /
                                           #   revnet at 4, 8, 16, 32 layers
    python benchmarks/headline.py seq --layers 8   # the same, batch 1, sequence 512..4096
    python benchmarks/headline.py qwen --layers 4  # qwen1.5-moe-shaped (vocab 151936),
                                                   #   hidden 256, batch 2 x 1024
    python benchmarks/headline.py plot     # benchmarks/headline/sweep.png from the JSON
    python benchmarks/headline.py report   # the Markdown tables docs/benchmarks.md shows

Results go to benchmarks/headline/*.json. Run with OMP_NUM_THREADS=1 (the step times are
ratios inside one run; CPU figures are MemTracker's, machine-independent).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from revffn_fx.tools.bench_models import preset_config
from revffn_fx.tools.step_bench import run_step_bench
from revffn_fx.tools.step_result import StepResult, plot_sweep

OUT = Path(__file__).resolve().parent / "headline"
SWEEP = ["ckpt", "exact", "revffn", "revnet"]
MAIN = ["sft", "ckpt", "ckpt+fused", "exact/no-fusion", "exact", "revffn/no-head",
        "revffn/no-fusion", "revffn", "revnet/no-head", "revnet/no-fusion", "revnet"]


def _save(name: str, results: list[StepResult]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    for r in results:
        print(r.title())
        print(r.to_markdown(), flush=True)


def _load(name: str) -> list[StepResult]:
    path = OUT / f"{name}.json"
    return [StepResult.from_dict(d) for d in json.loads(path.read_text())] if path.exists() else []


def _progress(done: int, total: int, what: str) -> None:
    print(f"  {done}/{total} {what}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("part", choices=["main", "depth", "seq", "qwen", "plot", "report"],
                    help="which table to measure (plot, report: render the measured ones)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the presets")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps per method")
    ap.add_argument("--layers", default=None, help="comma list (depth: 4,8,16,32)")
    ap.add_argument("--seq", type=int, default=1024, help="depth: tokens per sequence")
    ap.add_argument("--seqs", default="512,1024,2048,4096",
                    help="seq: the sequence lengths swept")
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences per step (None: each part's own)")
    ap.add_argument("--name", default=None, help="qwen: the JSON's name (default qwen)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    kw = dict(progress=_progress)
    if args.part == "main":
        layers = int(args.layers or 8)
        config = preset_config("mixtral-shaped", layers, args.hidden)
        _save("main", [run_step_bench(config, args.batch or 4, 1024, MAIN,
                                      repeats=args.repeats, isolate=True,
                                      label="mixtral-shaped", **kw)])
    elif args.part == "depth":
        out = []
        for n in [int(v) for v in (args.layers or "4,8,16,32").split(",")]:
            config = preset_config("mixtral-shaped", n, args.hidden)
            out.append(run_step_bench(config, args.batch or 2, args.seq, SWEEP, repeats=0,
                                      label="mixtral-shaped", **kw))
            _save("depth", out)
    elif args.part == "seq":
        out = []
        layers = int(args.layers or 16)
        for s in [int(v) for v in args.seqs.split(",")]:
            config = preset_config("mixtral-shaped", layers, args.hidden)
            out.append(run_step_bench(config, args.batch or 1, s, SWEEP, repeats=0,
                                      label="mixtral-shaped", **kw))
            _save("seq", out)
    elif args.part == "qwen":
        layers = int(args.layers or 8)
        config = preset_config("qwen1.5-moe-shaped", layers, args.hidden)
        _save(args.name or "qwen", [run_step_bench(config, args.batch or 2, 1024,
                                      ["sft", "ckpt", "exact", "revffn", "revnet",
                                       "revffn/no-head", "revffn/no-fusion"],
                                      repeats=args.repeats, label="qwen1.5-moe-shaped", **kw)])
    elif args.part == "plot":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        depth, seq = _load("depth"), _load("seq")
        fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), height_ratios=[3, 2])
        for col, res, x in ((0, depth, "layers"), (1, seq, "seq")):
            if not res:
                continue
            r = res[0]
            what = (f"batch {r.batch} x seq {r.seq}" if x == "layers"
                    else f"{r.layers} layers, batch {r.batch}")
            plot_sweep(res, x, None, SWEEP, ax=axes[0][col], title=(
                f"{r.model}, hidden {r.hidden}, vocab {r.vocab}, {what}, {r.dtype}, "
                "MemTracker peak"))
            # what reversibility adds beyond the exact mode, against the checkpoint
            # boundaries the exact mode keeps (layers x tokens x hidden x 4 bytes)
            ax = axes[1][col]
            xs = [getattr(q, x) for q in res]
            for m in ("revffn", "revnet"):
                ax.plot(xs, [(q.get(m).peak_bytes - q.get("exact").peak_bytes) / 2**20
                             for q in res], marker="o", label=f"{m} - exact")
            ax.plot(xs, [-q.layers * q.batch * q.seq * q.hidden * 4 / 2**20 for q in res],
                    ls="--", color="gray", label="- checkpoint boundaries")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.set_xlabel(axes[0][col].get_xlabel())
            ax.set_ylabel("peak minus exact mode (MiB)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Peak of a whole training step (forward, loss, backward, AdamW step)",
                     fontsize=10)
        fig.tight_layout()
        fig.savefig(OUT / "sweep.png", dpi=110)
        plt.close("all")
    else:
        for name in ("main", "qwen", "qwen8", "depth", "seq"):
            for r in _load(name):
                print(f"{name}: {r.title()}\n\n{r.to_markdown()}\n")
        for name in ("main", "qwen", "qwen8"):
            for r in _load(name):
                print(f"plan against {name}:\n\n{plan_vs_measured(r)}\n")


#: bench --step method -> the ``revffn plan`` row that predicts it (label, fused)
PLAN_ROWS = {"sft": ("plain fine-tuning", False), "ckpt": ("gradient checkpointing", False),
             "ckpt+fused": ("gradient checkpointing", True), "exact": ("exact mode", True),
             "revffn/no-head": ("reversible (revffn)", True),
             "revffn/no-fusion": ("reversible + lean loss head", False),
             "revffn": ("reversible + lean loss head", True)}


def plan_vs_measured(res: StepResult) -> str:
    """Markdown: ``revffn plan``'s estimate beside each measured peak it predicts."""
    from revffn_fx.tools.memory_plan import memory_plan

    config = preset_config(res.model, res.layers, res.hidden)
    plan = {(r.method, r.fused): r.total for r in memory_plan(config, res.batch, res.seq)}
    lines = ["| method | measured MiB | plan MiB | plan / measured |", "|---|---|---|---|"]
    for m, key in PLAN_ROWS.items():
        row = res.get(m)
        if row is None or not row.peak_bytes or key not in plan:
            continue
        lines.append(f"| {m} | {row.peak_bytes / 2**20:,.0f} | {plan[key] / 2**20:,.0f} | "
                     f"{plan[key] / row.peak_bytes:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
