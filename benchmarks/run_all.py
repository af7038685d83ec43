"""Produce docs/benchmarks.md: the benchmark, a profile of where the time goes, the estimator.

    .venv/bin/python benchmarks/run_all.py                 # all stages, 2 CPU threads
    .venv/bin/python benchmarks/run_all.py --stage render  # rewrite the doc from saved results

Stages: ``bench`` (``revffn bench`` on the mixtral-like config, depths 4/8/16/32, batch 4,
seq 256, fp32, 2 threads -> benchmarks/mixtral-like.json and .png), ``time`` (the same
without memory probes on one thread, for CPU-time ratios), ``profile``
(torch.profiler of one training step per method at 8 layers -> benchmarks/profile.json),
``render`` (docs/benchmarks.md from those files plus the analytic estimator).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks"
DOC = ROOT / "docs" / "benchmarks.md"
MODEL = "mixtral-like"
DEPTHS = "4,8,16,32"
BATCH, SEQ, THREADS = 4, 256, 2
BENCH_CMD = (f"revffn bench --synthetic {MODEL} --layers {DEPTHS} --batch {BATCH} --seq {SEQ} "
             f"--repeats {{repeats}} --threads {THREADS} --json benchmarks/{MODEL}.json "
             f"--plot benchmarks/{MODEL}.png")
TIME_CMD = (f"revffn bench --synthetic {MODEL} --layers {DEPTHS} --batch {BATCH} --seq {SEQ} "
            f"--repeats {{repeats}} --threads 1 --no-memory "
            f"--json benchmarks/{MODEL}-time-1thread.json")
PROFILE_DEPTH = 8
MiB = 2 ** 20


def stage_bench(repeats: int) -> None:
    """Run the benchmark through the CLI, exactly as the doc quotes it."""
    from revffn_fx.cli_bench import bench_command

    args = BENCH_CMD.format(repeats=repeats).split()[2:]
    t0 = time.perf_counter()
    bench_command.main(args, prog_name="revffn bench", standalone_mode=False)
    meta = {"wall_s": time.perf_counter() - t0, "repeats": repeats,
            "loadavg_after": os.getloadavg()}
    (OUT / f"{MODEL}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def stage_time(repeats: int) -> None:
    """A timing-only run on one thread (robust CPU-time ratios on a shared machine)."""
    from revffn_fx.cli_bench import bench_command

    bench_command.main(TIME_CMD.format(repeats=repeats).split()[2:], prog_name="revffn bench",
                       standalone_mode=False)


def stage_heads() -> None:
    """Saved bytes of the reversible stacks with RevModel's chunked head and with the model's
    original head: how much of the saving is the stack and how much the loss head."""
    import torch

    import revffn_fx as rf
    from revffn_fx.tools.bench_models import build
    from revffn_fx.tools.measure_memory import saved_tensor_bytes

    torch.set_num_threads(THREADS)
    out: list[dict[str, Any]] = []
    for depth in (4, 8, 32):
        model = build(MODEL, depth)
        ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ),
                            generator=torch.Generator().manual_seed(0))
        for coupling in ("revffn", "revnet"):
            for head in ("chunked", "original"):
                rev = rf.RevModel(model, coupling, loss_head=head).train()
                saved, loss = saved_tensor_bytes(lambda r=rev, x=ids: r(x, labels=x).loss)
                del loss
                out.append({"depth": depth, "method": coupling, "loss_head": head,
                            "saved_bytes": saved})
    (OUT / "heads.json").write_text(json.dumps(out, indent=2) + "\n")


def stage_profile(methods: list[str]) -> None:
    """torch.profiler: top CPU ops of one training step per method (after a warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from revffn_fx.tools.bench import _Runner
    from revffn_fx.tools.bench_models import build

    torch.set_num_threads(1)  # as the timing run: one thread is robust on a shared machine
    model = build(MODEL, PROFILE_DEPTH)
    ids = torch.randint(3, model.config.vocab_size, (BATCH, SEQ),
                        generator=torch.Generator().manual_seed(0))
    out: dict[str, Any] = {}
    for m in methods:
        runner = _Runner(m, model)
        with runner.active():
            runner.zero()
            runner.step(ids)
            runner.zero()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runner.step(ids)
            runner.zero()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[m] = {"total_self_cpu_ms": total / 1e3,
                  "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                           "calls": e.count} for e in top],
                  "counts": {k: sum(e.count for e in events if e.key == k)
                             for k in ("aten::_grouped_mm", "aten::mm", "aten::addmm",
                                       "aten::_scaled_dot_product_flash_attention_for_cpu",
                                       "aten::bmm")}}
    (OUT / "profile.json").write_text(json.dumps(out, indent=2) + "\n")


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MiB:.2f}"


def _targets(res: Any, tres: Any | None) -> list[str]:
    """The issue's targets, checked against the measured figures."""
    lines = []
    rf8, ck8 = res.get(8, "revffn"), res.get(8, "checkpoint")
    rf4, rf32 = res.get(4, "revffn"), res.get(32, "revffn")
    ok = rf8.saved_bytes <= 0.5 * ck8.saved_bytes
    lines.append(f"| revffn saved <= 1/2 of checkpointing at 8 layers | "
                 f"{_mib(rf8.saved_bytes)} vs {_mib(ck8.saved_bytes)} MiB "
                 f"({rf8.saved_bytes / ck8.saved_bytes:.2f}x) | {'met' if ok else 'missed'} |")
    flat = rf32.saved_bytes / rf4.saved_bytes
    lines.append(f"| revffn saved flat in depth (32 vs 4 layers within 10%) | "
                 f"{_mib(rf4.saved_bytes)} -> {_mib(rf32.saved_bytes)} MiB ({flat:.3f}x) | "
                 f"{'met' if abs(flat - 1) <= 0.10 else 'missed'} |")
    for m in ("revffn", "revnet"):
        cells = [(d, res.get(d, m), res.get(d, "checkpoint")) for d in res.depths if d >= 8]
        below = all(r.peak_bytes < c.peak_bytes for _, r, c in cells)
        figs = ", ".join(f"{d}: {r.peak_bytes / c.peak_bytes:.3f}x" for d, r, c in cells)
        lines.append(f"| {m} peak below checkpointing from 8 layers | {figs} | "
                     f"{'met' if below else 'missed'} |")
        below_f = all(r.peak_fused_bytes < c.peak_fused_bytes for _, r, c in cells)
        figs_f = ", ".join(f"{d}: {r.peak_fused_bytes / c.peak_fused_bytes:.3f}x"
                           for d, r, c in cells)
        lines.append(f"| (same, gradients freed on arrival) {m} | {figs_f} | "
                     f"{'met' if below_f else 'missed'} |")
        times = [(d, res.get(d, m).ratio["time"]) for d in res.depths]
        lines.append(f"| {m} step time <= 1.1x checkpointing (wall, 2 threads, loaded machine) | "
                     + ", ".join(f"{d}: {t:.2f}x" for d, t in times) + " | not conclusive |")
        if tres is not None:
            for key, what in (("cpu", "CPU time"), ("time", "wall time")):
                times = [(d, tres.get(d, m).ratio[key]) for d in tres.depths]
                worst = max(t for _, t in times)
                lines.append(f"| {m} step {what} <= 1.1x checkpointing (1 thread) | "
                             + ", ".join(f"{d}: {t:.2f}x" for d, t in times)
                             + f" | {'met' if worst <= 1.1 else 'missed'} |")
    return lines


def stage_render() -> None:
    """Write docs/benchmarks.md from the saved results and the estimator."""
    from revffn_fx.tools.bench_models import synthetic_config
    from revffn_fx.tools.bench_result import BenchResult, Measurement
    from revffn_fx.tools.estimate_memory import estimate_peak_bytes, estimate_saved_bytes

    def load(path: Path) -> Any:
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        rows = [Measurement(**r) for r in data.pop("rows")]
        return BenchResult(rows=rows, **data)

    res = load(OUT / f"{MODEL}.json")
    tres = load(OUT / f"{MODEL}-time-1thread.json")
    meta = json.loads((OUT / f"{MODEL}.meta.json").read_text())
    prof = json.loads((OUT / "profile.json").read_text()) if (OUT / "profile.json").exists() \
        else {}
    mach = res.machine
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    L: list[str] = []
    w = L.append
    w("# Benchmarks: reversible couplings against no checkpointing and activation checkpointing\n")
    w("Every figure below was measured by the command written next to it; the memory figures "
      "are exact byte counts (machine-independent), the times depend on the machine.\n")
    w("## Machine and software\n")
    w(f"- CPU: {mach.get('cpu')}, {mach.get('cores')} cores visible, "
      f"torch threads {mach.get('torch_threads')}")
    w(f"- torch {mach.get('torch')}, transformers {mach.get('transformers')}, "
      f"python {mach.get('python')}; revffn-fx at commit {git or '?'} plus working tree")
    w(f"- the machine was shared with other jobs (load average after the run: "
      f"{', '.join(f'{x:.1f}' for x in meta['loadavg_after'])}); methods are interleaved "
      "per repeat so the load hits them alike, but single timings are noisy\n")
    w("## The run\n")
    w("```")
    w(".venv/bin/python benchmarks/run_all.py --stage bench   # runs:")
    w(BENCH_CMD.format(repeats=res.repeats))
    w("```\n")
    w(f"Model: `{MODEL}` (Mixtral architecture, hidden 256, 8 experts top-2, intermediate 512, "
      "vocab 1024, 8 heads, 4 KV heads, sdpa attention, grouped_mm experts; random weights, "
      f"seed 0). Batch {res.batch} x seq {res.seq}, {res.dtype}, {res.device}. A step is "
      "forward + causal-LM loss + backward in train mode. Wall time of the bench stage: "
      f"{meta['wall_s'] / 60:.1f} min.\n")
    w("Columns: **saved** = bytes saved for backward (unique storages, parameters and their "
      "views excluded); **peak** = peak live tensor bytes of the whole step, parameters "
      "included (the gradients are part of it); **peak, grads freed** = the same with each "
      "gradient dropped as soon as it is accumulated (what an optimizer fused into the "
      "backward sees); **step s** = median step time; ratios are to `checkpoint` at the same "
      "depth, same run.\n")
    w(res.to_markdown() + "\n")
    if all(r.cpu_s is None for r in res.rows):
        w("(The CPU-time columns are empty: this run was made before `revffn bench` recorded "
          "CPU time; see the one-thread run below.)\n")
    w(f"![memory and time against depth]({'../benchmarks/' + MODEL + '.png'})\n")
    if tres is not None:
        # the memory of the 2-thread run with the CPU-time ratios of the 1-thread run
        import copy

        both = copy.deepcopy(res)
        for r in both.rows:
            t = tres.get(r.depth, r.method)
            r.ratio["time"] = t.ratio.get("cpu") if t is not None else None
        both.model = f"{MODEL} (memory: 2-thread run; time ratio: CPU time, 1-thread run)"
        both.plot(OUT / f"{MODEL}-combined.png")
        w("The same memory figures with the time ratios of the one-thread run below "
          "(process CPU time), written by the render stage:\n")
        w(f"![memory and CPU-time ratio against depth](../benchmarks/{MODEL}-combined.png)\n")
    if tres is not None:
        w("### Time on one thread (timing only)\n")
        w("The wall times above were taken on a machine shared with other jobs (load average "
          "about 6 on 2 cores): with 2 threads each, the OpenMP workers of a step wait for one "
          "another while descheduled, and single steps took 10-50x longer than on an idle "
          "machine, so those wall-time ratios are noise. This run uses one thread and also "
          "reports the process CPU time of each step, which excludes time spent descheduled:\n")
        w("```")
        w(TIME_CMD.format(repeats=tres.repeats))
        w("```\n")
        w(tres.to_markdown() + "\n")
    w("## Targets of issue 7\n")
    w("| target | measured | verdict |")
    w("|---|---|---|")
    L.extend(_targets(res, tres))
    w("")
    heads = OUT / "heads.json"
    if heads.exists():
        w("### The loss head's share\n")
        w("The reversible methods run RevModel's default chunked loss head (the logits are "
          "never materialised; it keeps its gradients for the hidden states and the head "
          "weight, 1 + 1 MiB here), while `none` and `checkpoint` run the model's own head "
          "(head input 1 MiB + fp32 log-softmax 4 MiB). The same stacks with the original "
          "head:\n")
        w("```")
        w(".venv/bin/python benchmarks/run_all.py --stage heads")
        w("```\n")
        w("| layers | coupling | loss head | saved MiB | / checkpoint (same depth, table above) |")
        w("|---|---|---|---|---|")
        for h in json.loads(heads.read_text()):
            ck = res.get(h["depth"], "checkpoint")
            ratio = f"{h['saved_bytes'] / ck.saved_bytes:.2f}x" if ck and ck.saved_bytes else "-"
            w(f"| {h['depth']} | {h['method']} | {h['loss_head']} | {_mib(h['saved_bytes'])} | "
              f"{ratio} |")
        w("")
    if prof:
        w(f"## Where the time goes (torch.profiler, {PROFILE_DEPTH} layers, one step, "
          "1 thread)\n")
        w("```")
        w(".venv/bin/python benchmarks/run_all.py --stage profile")
        w("```\n")
        w("Self CPU time of the top ops per method (ms), total self CPU time in the heading.\n")
        for m, p in prof.items():
            w(f"**{m}** (total {p['total_self_cpu_ms']:.0f} ms; grouped_mm calls "
              f"{p['counts'].get('aten::_grouped_mm', 0)}, sdpa calls "
              f"{p['counts'].get('aten::_scaled_dot_product_flash_attention_for_cpu', 0)})\n")
            w("| op | self CPU ms | calls |")
            w("|---|---|---|")
            for e in p["top"][:8]:
                w(f"| `{e['op']}` | {e['self_cpu_ms']:.1f} | {e['calls']} |")
            w("")
    w("## The estimator against the probe\n")
    w("`revffn_fx.tools.estimate_memory.estimate_saved_bytes(config, batch, seq, method)` "
      "reads only the config. Against the measured saved bytes above:\n")
    w("| layers | method | saved MiB | estimated | error | peak MiB | estimated | error |")
    w("|---|---|---|---|---|---|---|---|")
    for r in res.rows:
        if r.saved_bytes is None:
            continue
        cfg = synthetic_config(MODEL, r.depth)
        est = estimate_saved_bytes(cfg, res.batch, res.seq, r.method)
        pk = estimate_peak_bytes(cfg, res.batch, res.seq, r.method)
        w(f"| {r.depth} | {r.method} | {_mib(r.saved_bytes)} | {_mib(est)} | "
          f"{(est - r.saved_bytes) / r.saved_bytes:+.1%} | {_mib(r.peak_bytes)} | {_mib(pk)} | "
          f"{(pk - r.peak_bytes) / r.peak_bytes:+.1%} |")
    w("")
    extra = OUT / "notes.md"
    if extra.exists():
        w(extra.read_text())
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(L).rstrip() + "\n")
    print(f"wrote {DOC}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--stage", choices=["all", "bench", "time", "heads", "profile", "render"],
                    default="all", help="which measurements to run (render: only the doc)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per bench cell")
    ap.add_argument("--time-repeats", type=int, default=3,
                    help="repeats of the one-thread timing stage")
    args = ap.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    if args.stage in ("all", "bench"):
        stage_bench(args.repeats)
    if args.stage in ("all", "time"):
        stage_time(args.time_repeats)
    if args.stage in ("all", "heads"):
        stage_heads()
    if args.stage in ("all", "profile"):
        stage_profile(["none", "checkpoint", "revffn", "revnet"])
    if args.stage in ("all", "render"):
        stage_render()


if __name__ == "__main__":
    main()
