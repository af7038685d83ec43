"""Fine-tuning quality: reversible couplings against plain full fine-tuning.

From the same pretrained model (``examples/tiny-moe-stdlib``), on the same task data
(``examples/data``), with the same steps, batch, seed and learning-rate schedule (cosine,
5% warm-up), fine-tune

- ``full``:    the original model, plain full fine-tuning;
- ``revffn2``: the revffn coupling with the two-stage recipe (adapters warm-up, then all);
- ``revnet``:  the revnet coupling (no new parameters), full fine-tuning;

and variants (``--runs``, see ``RUNS``). Reports eval-loss curves (completion tokens) and
exact-match accuracy of greedy answers on the eval split:

    python benchmarks/quality.py --out docs/quality.json --plot docs/quality.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from revffn_fx.training.two_stage import TwoStageCallback

ROOT = Path(__file__).resolve().parents[1]


def _finetune_module() -> Any:
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "examples" / "finetune.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module
    spec.loader.exec_module(module)
    return module


ft = _finetune_module()


@dataclass
class Run:
    """One fine-tuning configuration."""

    coupling: str
    warmup_steps: int = 0  # two-stage warm-up (0: plain full fine-tuning)
    warmup_lr: float | None = None  # stage-1 lr (default: the common lr)
    train_norms: bool = False
    # "copy" (up = [I; I]), "pad" (up = [I; 0] for both branches), "aligned" (each stream
    # at its own feature positions: make_adapters' default), "calibrated" (least squares on
    # the first fine-tuning examples, rf.calibrate)
    adapter_init: str = "copy"
    stream_dtype: str | None = None  # rf.transform(stream_dtype=...): wide streams
    adapter_lr_mult: float = 1.0  # adapters' lr relative to the common lr (own param group)
    random_init: bool = False  # start from random weights of the same shape (a control)
    momentum: float | None = None  # rf.transform(momentum=...): momentum / meft couplings
    bdia_gamma: float | None = None  # rf.transform(bdia_gamma=...): the bdia coupling
    # rf.transform(coupling, momentum / bdia_gamma) and every other option at its default
    # (adapters, stream dtype, exact streams as rf.transform sets them; "none": the exact mode)
    defaults: bool = False
    note: str = ""


RUNS: dict[str, Run] = {
    "full": Run("none", note="original model, plain full fine-tuning"),
    "revffn2": Run("revffn", warmup_steps=50, warmup_lr=3e-3,
                   note="revffn, two-stage: 50 adapter-only steps at lr 3e-3, then all"),
    "revnet": Run("revnet", note="revnet, full fine-tuning"),
    "revffn": Run("revffn", note="revffn, full fine-tuning from step 0 (no warm-up)"),
    "revffn2-lr1": Run("revffn", warmup_steps=50, note="revffn, two-stage, warm-up at common lr"),
    "revffn2-w100": Run("revffn", warmup_steps=100, warmup_lr=3e-3,
                        note="revffn, two-stage, 100 warm-up steps"),
    "revffn2-norms": Run("revffn", warmup_steps=50, warmup_lr=3e-3, train_norms=True,
                         note="revffn, two-stage, norms trained in the warm-up too"),
    "revffn2-pad": Run("revffn", warmup_steps=50, warmup_lr=3e-3, adapter_init="pad",
                       note="revffn, two-stage, up-adapters zero-padded instead of copied"),
    "revffn-pad": Run("revffn", adapter_init="pad",
                      note="revffn, no warm-up, up-adapters zero-padded instead of copied"),
    "revffn-aligned": Run("revffn", adapter_init="aligned",
                          note="revffn, no warm-up, streams at their own feature positions"),
    "revffn-cal": Run("revffn", adapter_init="calibrated", stream_dtype="float64",
                      note="revffn, no warm-up, adapters calibrated (least squares) on "
                           "the first 512 training examples, fp64 streams"),
    "revffn-cal32": Run("revffn", adapter_init="calibrated",
                        note="revffn-cal with fp32 streams (reconstruction rounding: up "
                             "to 0.7% gradient error in the first layer)"),
    "revffn-cal-alr3": Run("revffn", adapter_init="calibrated", stream_dtype="float64",
                           adapter_lr_mult=3.0,
                           note="revffn-cal with the adapters at 3x the common lr"),
    "full-random": Run("none", random_init=True,
                       note="control: the same architecture from random weights, full training"),
    "revffn-random": Run("revffn", random_init=True,
                         note="control: revffn coupling of the random-weight model"),
    "revnet-random": Run("revnet", random_init=True,
                         note="control: revnet coupling of the random-weight model"),
    "momentum": Run("momentum", momentum=0.125, stream_dtype="float64",
                    note="momentum coupling, g = 1/8, fp64 streams, full fine-tuning"),
    "momentum4": Run("momentum", momentum=0.25, stream_dtype="float64",
                     note="momentum coupling, g = 1/4, fp64 streams"),
    "momentum16": Run("momentum", momentum=0.0625, stream_dtype="float64",
                      note="momentum coupling, g = 1/16, fp64 streams"),
    "meft": Run("meft", momentum=0.125, stream_dtype="float64",
                note="meft coupling (scaled revnet keeping the pretrained function), "
                     "g = 1/8, fp64 streams, full fine-tuning"),
    "meft4": Run("meft", momentum=0.25, stream_dtype="float64",
                 note="meft coupling, g = 1/4, fp64 streams"),
    "bdia": Run("bdia", bdia_gamma=0.5, note="bdia, gamma = +-1/2 (1 stored bit), evaluated "
                                             "as the original layers"),
    "bdia4": Run("bdia", bdia_gamma=0.25, note="bdia, gamma = +-1/4 (2 bits)"),
    "bdia8": Run("bdia", bdia_gamma=0.125, note="bdia, gamma = +-1/8 (3 bits)"),
    "revffn2-cal": Run("revffn", warmup_steps=50, warmup_lr=3e-3, adapter_init="calibrated",
                       stream_dtype="float64",
                       note="revffn, two-stage, adapters calibrated first, fp64 streams"),
}

CALIBRATION_EXAMPLES = 512


@dataclass
class Result:
    name: str
    run: dict[str, Any]
    eval_loss: float
    exact_match: float
    start_eval_loss: float
    train_seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    stdlib_loss: float | None = None  # held-out pretraining text after fine-tuning


def _reinit_adapters(model: Any, how: str, tok: Any = None,
                     rows: list[dict[str, str]] | None = None) -> None:
    """Set the adapters explicitly, whatever make_adapters' default is."""
    if how == "calibrated":  # (also sets fp64 streams; the run's stream_dtype then wins)
        print(f"  {ft.calibrate_on_rows(model, tok, rows or [])}", flush=True)
        return
    if how not in ("copy", "pad", "aligned"):
        raise ValueError(f"unknown adapter init {how!r}")
    with torch.no_grad():
        for mods in model.adapters.values():
            for key in ("F_up", "G_up"):
                w = mods[key].weight  # (d, d/2)
                half = w.shape[1]
                w.zero_()
                # aligned: F reads X2 (second half of H), G reads Y1 (first half)
                at_second = how == "aligned" and key == "F_up"
                (w[half:] if at_second else w[:half]).copy_(torch.eye(half))
                if how == "copy":
                    w[half:].copy_(torch.eye(half))


def build_model(run: Run, model_dir: Path, device: str = "cpu", tok: Any = None,
                calibration_rows: list[dict[str, str]] | None = None) -> torch.nn.Module:
    """The model a run fine-tunes (train mode), from the pretrained ``model_dir``."""
    if run.defaults:  # rf.transform with its defaults and the run's own option, nothing else
        import revffn_fx as rf

        base = rf.load_model(model_dir, experts_implementation="eager").to(device)
        own = ({"momentum": run.momentum} if run.momentum is not None else
               {"bdia_gamma": run.bdia_gamma} if run.bdia_gamma is not None else {})
        if run.stream_dtype is not None:  # e.g. "int32": the 4-byte exact streams
            own["stream_dtype"] = run.stream_dtype
        return rf.transform(base, coupling=run.coupling, **own).train()
    if run.random_init:
        from transformers import AutoModelForCausalLM

        import revffn_fx as rf

        base = AutoModelForCausalLM.from_config(
            rf.load_model(model_dir).config, dtype=torch.float32,
            experts_implementation="eager").to(device)
        model = (rf.transform(base, coupling=run.coupling) if run.coupling != "none"
                 else base).train()
    elif run.momentum is not None or run.bdia_gamma is not None:
        import revffn_fx as rf

        base = rf.load_model(model_dir, experts_implementation="eager").to(device)
        own = ({"momentum": run.momentum} if run.momentum is not None else
               {"bdia_gamma": run.bdia_gamma} if run.bdia_gamma is not None else {})
        model = rf.transform(base, coupling=run.coupling, **own).train()
    else:
        model = ft.load_for_finetune(model_dir, run.coupling, device=device)
    if run.coupling == "revffn":
        _reinit_adapters(model, run.adapter_init, tok, calibration_rows)
    if run.coupling != "none":
        from revffn_fx.model_setup import parse_stream_dtype

        model.options.stream_dtype = parse_stream_dtype(run.stream_dtype)
    return model


def run_one(name: str, run: Run, model_dir: Path, train_rows: list[dict[str, str]],
            eval_rows: list[dict[str, str]], steps: int, lr: float, batch: int,
            eval_steps: int, out_dir: Path, device: str = "cpu", seed: int = 0,
            stdlib: torch.Tensor | None = None) -> Result:
    """Fine-tune one configuration from the pretrained model; measure it."""
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = build_model(run, model_dir, device, tok, train_rows[:CALIBRATION_EXAMPLES])
    args = ft.training_args(out_dir / name, steps, lr, batch, eval_steps, seed=seed,
                            eval_on_start=True, disable_tqdm=True, use_cpu=device == "cpu")
    cb = (TwoStageCallback(warmup_steps=run.warmup_steps, warmup_lr=run.warmup_lr,
                           train_norms=run.train_norms) if run.warmup_steps else None)
    optimizer = None
    if run.adapter_lr_mult != 1.0:
        new = [p for n, p in model.named_parameters() if n.startswith("adapters.")]
        old = [p for n, p in model.named_parameters() if not n.startswith("adapters.")]
        optimizer = torch.optim.AdamW([{"params": old}, {"params": new,
                                                          "lr": lr * run.adapter_lr_mult}],
                                      lr=lr, weight_decay=0.0)
    t0 = time.time()
    _, history = ft.finetune(model, tok, train_rows, eval_rows, args, cb, optimizer=optimizer)
    seconds = time.time() - t0
    curve = [(r["step"], r["eval_loss"]) for r in history.records if "eval_loss" in r]
    em = ft.exact_match(model, tok, eval_rows)
    res = Result(name, asdict(run), curve[-1][1], em, curve[0][1], round(seconds, 1), curve)
    if stdlib is not None:  # forgetting: the pretraining loss after fine-tuning
        with torch.no_grad():
            res.stdlib_loss = _pretrain_module().eval_loss(model, stdlib.to(device), seq=128)
    held = f"  stdlib {res.stdlib_loss:.4f}" if res.stdlib_loss is not None else ""
    print(f"{name:14s} eval loss {res.eval_loss:.4f} (start {res.start_eval_loss:.3f})  "
          f"exact match {em:5.1f}%{held}  {seconds:.0f}s", flush=True)
    return res


def _pretrain_module() -> Any:  # examples/ is not a package
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "examples" /
                                                  "pretrain_tiny_moe.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stdlib_held_out(model_dir: Path) -> torch.Tensor:
    """The held-out stdlib text the example model was evaluated on (its tokenizer)."""
    from transformers import AutoTokenizer

    pre = _pretrain_module()
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, held_out = pre.split_files(pre.stdlib_files())
    return pre.encode(tok, pre.read_texts(held_out, 2_000_000))


def plot(results: list[Result], path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from plot_quality import plot_curves

    plot_curves([(r.name, r.curve, r.exact_match) for r in results], path,
                "Fine-tuning tiny-moe-stdlib on arithmetic word problems")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=ft.DEFAULT_MODEL,
                        help="local model directory to fine-tune")
    parser.add_argument("--data", type=Path, default=ft.DEFAULT_DATA,
                        help="directory with train.jsonl and eval.jsonl")
    parser.add_argument("--runs", default="full,revffn2,revnet",
                        help=f"comma-separated, from {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch", type=int, default=16, help="examples per step")
    parser.add_argument("--eval-steps", type=int, default=25, help="evaluate every N steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data order and of any randomness in training")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write the loss plot here")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/revffn-quality"),
                        help="scratch directory for the runs' checkpoints")
    parser.add_argument("--keyed", action="store_true",
                        help="key the runs in --out by name@steps/seed (merge many runs)")
    parser.add_argument("--forgetting", action="store_true",
                        help="also measure the held-out stdlib loss after fine-tuning")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train_rows = ft.read_jsonl(args.data / "train.jsonl")
    eval_rows = ft.read_jsonl(args.data / "eval.jsonl")
    stdlib = stdlib_held_out(args.model) if args.forgetting else None
    results = [run_one(n, RUNS[n], args.model, train_rows, eval_rows, args.steps, args.lr,
                       args.batch, args.eval_steps, args.work_dir, args.device, args.seed,
                       stdlib)
               for n in args.runs.split(",")]
    base = next((r for r in results if r.name == "full"), None)
    print("\n| run | final eval loss | vs full | exact match | vs full | stdlib loss | time |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        dl = f"{100 * (r.eval_loss / base.eval_loss - 1):+.1f}%" if base else "-"
        dm = f"{r.exact_match - base.exact_match:+.1f}" if base else "-"
        held = f"{r.stdlib_loss:.4f}" if r.stdlib_loss is not None else "-"
        print(f"| {r.name} | {r.eval_loss:.4f} | {dl} | {r.exact_match:.1f}% | {dm} | {held} | "
              f"{r.train_seconds:.0f}s |")
    meta = {"steps": args.steps, "lr": args.lr, "batch": args.batch, "threads": args.threads,
            "seed": args.seed,
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
            "eval_problems": len(eval_rows), "train_problems": len(train_rows),
            "torch": torch.__version__, "command": " ".join(sys.argv)}
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else {}
        key = (lambda r: f"{r.name}@{args.steps}/{args.seed}") if args.keyed else (
            lambda r: r.name)
        runs = {**old.get("runs", {}), **{key(r): asdict(r) for r in results}}
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
