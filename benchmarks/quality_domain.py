"""Fine-tuning quality on another domain: a benchmark that resolves 1%.

The shipped pretrained model (``examples/tiny-moe-stdlib``, Python stdlib source) is
fine-tuned on the records of an invented province (``examples/make_domain_corpus.py``:
English-like prose and plain records over one fixed world of facts; 1.11 M training tokens,
a held-out split of 69 k tokens drawn with another seed), by plain full fine-tuning (``full``)
and through each coupling with ``rf.transform``'s defaults (``DOMAIN_RUNS``). Measured:

- **held-out domain loss**: the mean next-token loss over every token of the held-out split
  (windows of 128 predicted tokens, stride 128: each token predicted once);
- **forgetting**: the held-out Python stdlib loss (``quality.stdlib_held_out``, the
  pretrained model's own evaluation text; 4.126 before fine-tuning).

Training: AdamW (betas 0.9/0.999, no weight decay), gradients clipped to norm 1, a linear
warm-up of ``WARMUP`` steps then a **constant** learning rate, so a run evaluated at step 300
on its way to 1200 *is* the 300-step run: one run gives both figures. With ``--schedule
linear`` (the Trainer's default) the lr decays linearly to 0 at ``--steps`` instead: a run
per length (its files end in ``-linear<steps>``; the summary takes each such run at its
length only). Each step reads
``--batch`` random windows of ``--seq`` tokens; the windows of every step are drawn up front
from the seed (``--seeds``), the same for every run of a seed, so runs of one seed see the
same data in the same order (bdia's gamma draws also follow the seed).

Each (run, seed) writes its JSON to ``--results`` after every evaluation (every
``--eval-every`` steps) and keeps its latest state (weights, optimizer, RNG) under
``--work-dir``; ``--steps 1200`` on a run that stopped at 300 resumes it from there. So the
benchmark runs in phases, the summary merges whatever finished:

    python benchmarks/quality_domain.py --seeds 0,1,2 --steps 300 \\
        --runs full,none,revffn,revnet,momentum,meft,bdia2,bdia4,bdia8
    python benchmarks/quality_domain.py --seeds 0,1,2 --steps 1200 --order seed --eval-every 600 \\
        --runs full,momentum,bdia8
    python benchmarks/quality_domain.py --seeds 0,1,2 --steps 1200 --order seed --eval-every 600 \\
        --runs bdia2,bdia4,meft,none,revnet,revffn
    python benchmarks/quality_domain.py --summarize --out docs/quality-domain.json

and, with the decaying lr, in their own results directory (a run per length):

    python benchmarks/quality_domain.py --schedule linear --steps 300 --order seed \\
        --runs full,bdia16,bdia8,momentum,none,meft,revnet,bdia4,bdia2,revffn \\
        --work-dir /tmp/q-lin --results /tmp/q-lin/results
    python benchmarks/quality_domain.py --schedule linear --steps 1200 --eval-every 1200 \\
        --order seed --runs full,bdia16,momentum,none,bdia8 \\
        --work-dir /tmp/q-lin --results /tmp/q-lin/results
    python benchmarks/quality_domain.py --summarize --results /tmp/q-lin/results \\
        --out docs/quality-domain-linear.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import ROOT, Run, _pretrain_module, build_model, stdlib_held_out  # noqa: E402

DEFAULT_MODEL = ROOT / "examples" / "tiny-moe-stdlib"
WORK = Path("/tmp/q-domain")
WARMUP = 30
HORIZON = 4800  # windows are drawn for this many steps, whatever --steps is

DOMAIN_RUNS: dict[str, Run] = {
    "full": Run("none", note="the original model, plain full fine-tuning"),
    "none": Run("none", defaults=True, note="exact mode: the same function, every layer "
                                            "checkpointed, the lean loss head"),
    "revffn": Run("revffn", defaults=True, note="revffn with rf.transform's defaults"),
    "revnet": Run("revnet", defaults=True, note="revnet with rf.transform's defaults"),
    "momentum": Run("momentum", defaults=True, note="momentum, default g = 1/8, exact streams"),
    "meft": Run("meft", defaults=True, note="meft, default g = 1/8, exact streams"),
    "bdia2": Run("bdia", bdia_gamma=0.5, defaults=True, note="bdia, gamma = 1/2 (1 bit)"),
    "bdia4": Run("bdia", bdia_gamma=0.25, defaults=True, note="bdia, gamma = 1/4 (2 bits)"),
    "bdia8": Run("bdia", bdia_gamma=0.125, defaults=True, note="bdia, gamma = 1/8 (3 bits)"),
    "bdia16": Run("bdia", bdia_gamma=0.0625, defaults=True,
                  note="bdia, gamma = 1/16 (4 bits; the default)"),
    # the 4-byte exact streams (int32 units of 2**-16, runtime/grid.py) over these fp32
    # weights, whose default grid is float64: the coarser grid's cost in quality
    "momentum-i32": Run("momentum", defaults=True, stream_dtype="int32",
                        note="momentum, g = 1/8, int32 exact streams"),
    "bdia16-i32": Run("bdia", bdia_gamma=0.0625, defaults=True, stream_dtype="int32",
                      note="bdia, gamma = 1/16, int32 exact streams"),
}


def _corpus_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_domain_corpus",
                                                  ROOT / "examples" / "make_domain_corpus.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_domain_corpus"] = module
    spec.loader.exec_module(module)
    return module


def corpus(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token streams: each document tokenized, then end-of-text."""
    from transformers import AutoTokenizer

    gen, pre = _corpus_module(), _pretrain_module()
    tok = AutoTokenizer.from_pretrained(model_dir)
    world = gen.make_world()
    return (pre.encode(tok, gen.documents("train", world=world)),
            pre.encode(tok, gen.documents("held_out", world=world)))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, data: torch.Tensor, seq: int = 128,
                  batch: int = 16) -> tuple[float, int]:
    """Mean next-token loss over every token of ``data`` after the first (windows of
    ``seq + 1`` tokens, stride ``seq``; the last partial window dropped), and the count."""
    was = model.training
    model.eval()
    n = (len(data) - 1) // seq
    windows = torch.stack([data[i * seq:i * seq + seq + 1] for i in range(n)])
    total = 0.0
    for w in windows.split(batch):
        total += model(input_ids=w, labels=w).loss.item() * w.shape[0] * seq
    model.train(was)
    return total / (n * seq), n * seq


def window_starts(seed: int, n_tokens: int, batch: int, seq: int) -> torch.Tensor:
    """The start of every window of every step, (HORIZON, batch), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq, (HORIZON, batch), generator=gen)


def train_run(name: str, seed: int, steps: int, args: argparse.Namespace,
              train: torch.Tensor, held: torch.Tensor, stdlib: torch.Tensor) -> None:
    """Train (or resume) one run of one seed to ``steps``; write its JSON at each eval."""
    run = DOMAIN_RUNS[name]
    tag = f"{name}-s{seed}" + ("" if args.schedule == "constant" else f"-linear{steps}")
    out = args.results / f"{tag}.json"
    state_path = args.work_dir / "state" / f"{tag}.pt"
    record: dict[str, Any] = (json.loads(out.read_text()) if out.is_file() else
                              {"name": name, "seed": seed, "run": asdict(run), "evals": {},
                               "train_loss": [], "train_seconds": 0.0,
                               "schedule": args.schedule,
                               "horizon": None if args.schedule == "constant" else steps})
    if record.get("error"):
        del record["error"]
    torch.manual_seed(seed)
    model = build_model(run, args.model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    step = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
    if step >= steps:
        print(f"{name} seed {seed}: already at step {step}", flush=True)
        return
    starts = window_starts(seed, len(train), args.batch, args.seq)
    offsets = torch.arange(args.seq)

    def evaluate(at: int) -> None:
        t0 = time.time()
        loss, n = held_out_loss(model, held, args.seq)
        std = _pretrain_module().eval_loss(model, stdlib, seq=args.seq)
        record["evals"][str(at)] = {"domain_loss": loss, "stdlib_loss": std}
        record["held_out_tokens"] = n
        print(f"{name} seed {seed} step {at}: domain {loss:.4f}  stdlib {std:.4f}  "
              f"(eval {time.time() - t0:.0f}s, train {record['train_seconds']:.0f}s)",
              flush=True)

    if step == 0 and "0" not in record["evals"]:
        # before training every seed of a run is the same model: measure it once
        done = [json.loads(p.read_text()) for p in args.results.glob(f"{name}-s*.json")]
        first = next((d for d in done if "0" in d.get("evals", {})), None)
        if first:
            record["evals"]["0"] = {**first["evals"]["0"], "copied_from_seed": first["seed"]}
        else:
            evaluate(0)
        args.results.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    running, t0 = None, time.time()
    model.train()
    while step < steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, args)
        ids = train[starts[step].unsqueeze(1) + offsets]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0:
            record["train_loss"].append([step, round(running, 4)])
        if step % args.eval_every == 0 or step == steps:
            record["train_seconds"] = round(record["train_seconds"] + time.time() - t0, 1)
            evaluate(step)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "rng": torch.get_rng_state(), "step": step}, state_path)
            record["steps_done"] = step
            out.write_text(json.dumps(record, indent=1) + "\n")
            t0 = time.time()


def lr_at(step: int, steps: int, args: argparse.Namespace) -> float:
    """The lr of ``step`` (0-based): a linear warm-up over ``WARMUP`` steps, then constant,
    or (``--schedule linear``, the Trainer's default) a linear decay to 0 at ``steps``."""
    warm = min(1.0, (step + 1) / WARMUP)
    if args.schedule == "constant" or step < WARMUP:
        return args.lr * warm
    return args.lr * max(0.0, (steps - step) / (steps - WARMUP))


def _stats(values: list[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    return {"mean": mean, "spread_pct": 100 * (max(values) - min(values)) / mean,
            "sd_pct": 100 * statistics.stdev(values) / mean if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(results: Path) -> dict[str, Any]:
    """Per run and length: the mean over seeds, the spread (max - min over mean), the change
    against full fine-tuning over the seeds both have (of the means, and per seed: the same
    data order)."""
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*-s*.json"))]
    by_run: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:  # a decaying run counts only at its horizon (and at step 0, before
        if r.get("horizon"):  # any lr): merged by length
            r["evals"] = {k: v for k, v in r["evals"].items() if k in ("0", str(r["horizon"]))}
        merged = by_run.setdefault(r["name"], {}).setdefault(r["seed"], {"evals": {}})
        merged["evals"].update(r["evals"])
        merged.update({k: v for k, v in r.items() if k != "evals"})
    table: dict[str, Any] = {}
    for name in [n for n in DOMAIN_RUNS if n in by_run]:
        row: dict[str, Any] = {"note": DOMAIN_RUNS[name].note, "by_length": {},
                               "train_loss": {s: r.get("train_loss", [])
                                              for s, r in sorted(by_run[name].items())},
                               "steps_done": {s: r.get("steps_done")
                                              for s, r in sorted(by_run[name].items())}}
        for at in ("0", "300", "600", "900", "1200"):
            seeds = {s: r["evals"][at] for s, r in by_run[name].items() if at in r["evals"]}
            if not seeds:
                continue
            cell: dict[str, Any] = {
                "seeds": sorted(seeds),
                "domain": _stats([e["domain_loss"] for e in seeds.values()]),
                "stdlib": _stats([e["stdlib_loss"] for e in seeds.values()]),
                "per_seed": {s: e for s, e in sorted(seeds.items())}}
            full = {s: r["evals"][at] for s, r in by_run.get("full", {}).items()
                    if at in r["evals"]}
            common = sorted(set(full) & set(seeds))
            if common and name != "full":  # over the seeds both have at this length
                full_mean = statistics.fmean(full[s]["domain_loss"] for s in common)
                mean = statistics.fmean(seeds[s]["domain_loss"] for s in common)
                cell["vs_full_pct"] = 100 * (mean / full_mean - 1)
                paired = [100 * (seeds[s]["domain_loss"] / full[s]["domain_loss"] - 1)
                          for s in common]
                cell["vs_full_paired_pct"] = {"mean": statistics.fmean(paired),
                                              "min": min(paired), "max": max(paired),
                                              "seeds": common}
            row["by_length"][at] = cell
        table[name] = row
    return table


def markdown(table: dict[str, Any]) -> str:
    """The table of docs/quality.md: per length the mean over seeds +- the spread, the
    change of the mean against full fine-tuning's mean, and per seed (paired, range)."""
    def loss(row: dict[str, Any], at: str) -> str:
        c = row["by_length"].get(at)
        if not c:
            return "not run"
        d = c["domain"]
        if d["n"] == 1:
            return f"{d['mean']:.4f} (n=1)"
        return f"{d['mean']:.4f} ± {d['spread_pct']:.2f}% (n={d['n']})"

    def vs(row: dict[str, Any], at: str) -> str:
        c = row["by_length"].get(at)
        if not c or "vs_full_pct" not in c:
            return "-"
        p = c["vs_full_paired_pct"]
        return (f"{c['vs_full_pct']:+.2f}% (per seed {p['min']:+.2f} to {p['max']:+.2f})"
                if len(p["seeds"]) > 1 else f"{c['vs_full_pct']:+.2f}% (seed {p['seeds'][0]})")

    def std(row: dict[str, Any]) -> str:
        return " / ".join(f"{row['by_length'][at]['stdlib']['mean']:.3f}"
                          if at in row["by_length"] else "-" for at in ("300", "1200"))

    lines = ["| run | domain loss, 300 steps | vs full | domain loss, 1200 steps | vs full | "
             "stdlib loss 300 / 1200 | seeds 300 / 1200 |", "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        seeds = " / ".join(",".join(map(str, row["by_length"][at]["seeds"]))
                           if at in row["by_length"] else "-" for at in ("300", "1200"))
        lines.append(f"| {name} | {loss(row, '300')} | {vs(row, '300')} | "
                     f"{loss(row, '1200')} | {vs(row, '1200')} | {std(row)} | {seeds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="the pretrained model directory to fine-tune")
    parser.add_argument("--runs", default="full,momentum,bdia16",
                        help=f"comma-separated, from {', '.join(DOMAIN_RUNS)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma list of seeds")
    parser.add_argument("--steps", type=int, default=300,
                        help="train each run to this step (resuming a shorter one)")
    parser.add_argument("--order", choices=["seed", "run"], default="run",
                        help="run: every seed of a run before the next run")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak lr, after the warm-up")
    parser.add_argument("--schedule", choices=["constant", "linear"], default="constant",
                        help="after the warm-up: constant (one run gives every length), or "
                             "linear decay to 0 at --steps (a run per length)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--eval-every", type=int, default=300,
                        help="evaluate every N steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--work-dir", type=Path, default=WORK,
                        help="the runs' latest states (to resume) live here")
    parser.add_argument("--results", type=Path, default=WORK / "results",
                        help="one JSON per run and seed")
    parser.add_argument("--summarize", action="store_true",
                        help="only merge --results into --out and print the table")
    parser.add_argument("--out", type=Path, default=None, help="summary JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.summarize:
        table = summarize(args.results)
        print(markdown(table))
        if args.out:
            meta_src = next(iter(sorted(args.results.glob("meta.json"))), None)
            meta = json.loads(meta_src.read_text()) if meta_src else {}
            meta["commands"] = [" ".join(line.split()) for line in __doc__.split("merges whatever "
                                                                       "finished:")[1]
                                .replace("\\\n", " ").splitlines()
                                if line.strip().startswith("python")]
            meta["spread"] = ("spread_pct: (max - min) / mean over seeds; sd_pct: sample "
                              "standard deviation / mean; vs_full_pct: mean over the common "
                              "seeds against full's mean over the same seeds")
            args.out.write_text(json.dumps({"meta": meta, "table": table}, indent=1) + "\n")
        return
    t0 = time.time()
    train, held = corpus(args.model)
    stdlib = stdlib_held_out(args.model)
    print(f"corpus: {len(train)} training tokens, {len(held)} held-out tokens; stdlib "
          f"held-out {len(stdlib)} tokens ({time.time() - t0:.0f}s)", flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    meta = {"train_tokens": len(train), "held_out_tokens": len(held), "lr": args.lr,
            "warmup": WARMUP, "batch": args.batch, "seq": args.seq, "threads": args.threads,
            "torch": torch.__version__,
            "schedule": ("linear warm-up, then constant" if args.schedule == "constant" else
                         "linear warm-up, then linear decay to 0 at the run's length"),
            "optimizer": "AdamW(betas 0.9/0.999, weight decay 0), grad norm clip 1"}
    (args.results / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    names, seeds = args.runs.split(","), [int(s) for s in args.seeds.split(",")]
    jobs = ([(n, s) for n in names for s in seeds] if args.order == "run" else
            [(n, s) for s in seeds for n in names])
    for name, seed in jobs:
        try:
            train_run(name, seed, args.steps, args, train, held, stdlib)
        except Exception as e:  # noqa: BLE001 - record it, go on with the next run
            print(f"{name} seed {seed}: FAILED {type(e).__name__}: {e}", flush=True)
            out = args.results / f"{name}-s{seed}.json"
            rec = json.loads(out.read_text()) if out.is_file() else {"name": name,
                                                                      "seed": seed,
                                                                      "evals": {}}
            rec["error"] = f"{type(e).__name__}: {e}"
            out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
