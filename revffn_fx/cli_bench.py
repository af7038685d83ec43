"""``revffn bench``: memory and time of a training step (:mod:`revffn_fx.tools.bench`) or,
with ``--step``, the peak of a whole training step with AdamW
(:mod:`revffn_fx.tools.step_bench`). Cheap checks come before torch and transformers are
imported, so bad input is answered at once."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from revffn_fx.cli_options import CONTEXT
from revffn_fx.errors import RevFFNError
from revffn_fx.exits import Command  # the exit statuses of every revffn command
from revffn_fx.output import check_model_dir, progress_reporter
from revffn_fx.tools.bench import EXTRA_METHODS, METHODS, run_bench
from revffn_fx.tools.bench_models import (
    PRESETS,
    SYNTHETIC,
    parse_dtype,
    source_config,
    synthetic_factory,
)
from revffn_fx.tools.step_bench import run_step_bench
from revffn_fx.tools.step_methods import DEFAULT_STEP_METHODS, STEP_METHODS
from revffn_fx.tools.step_result import plot_sweep


def parse_depths(spec: str) -> list[int]:
    """``--layers 4,8,16``: the depths to build synthetic models at."""
    try:
        depths = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise RevFFNError(f"bad --layers {spec!r}: use a comma list like 4,8,16,32") from None
    if not depths or min(depths) < 1:
        raise RevFFNError(f"bad --layers {spec!r}: layer counts must be positive")
    return depths


@click.command("bench", cls=Command, short_help="Measure memory and time of a training step.",
               context_settings=CONTEXT)
@click.argument("model_dir", required=False, type=click.Path(path_type=str))
@click.option("--synthetic", metavar="NAME",
              help=f"A synthetic model with random weights: {', '.join(SYNTHETIC)}.")
@click.option("--layers", default="4,8,16,32", show_default=True, metavar="LIST",
              help="Depths to build synthetic models at (ignored with MODEL_DIR, which runs "
                   "at its own layer count).")
@click.option("--batch", type=int, default=4, show_default=True,
              help="Sequences per training step.")
@click.option("--seq", type=int, default=256, show_default=True,
              help="Tokens per sequence.")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Timed steps per method (median reported).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Untimed steps per method before measuring.")
@click.option("--methods", default=",".join(METHODS), show_default=True, metavar="LIST",
              help=f"Methods to compare; also {', '.join(EXTRA_METHODS)}. With --step: "
                   "sft, ckpt, exact, offload (the exact mode with saved tensors in pinned "
                   "host memory), every coupling by name, <coupling>/no-head, /no-fusion "
                   "(revffn_fx.tools.step_bench.STEP_METHODS).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True,
              help="Synthetic models' dtype (MODEL_DIR keeps its own unless given).")
@click.option("--threads", type=int, default=None,
              help="torch.set_num_threads (CPU)  [default: torch's own]")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Run the memory probes (--no-memory: a timing-only run).")
@click.option("--json", "json_path", type=click.Path(path_type=str),
              help="Write every measurement as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str),
              help="Write a PNG plot here (needs matplotlib).")
@click.option("--wide", is_flag=True,
              help="Every column (all ratios to checkpointing, CPU time, tokens/s, CUDA "
                   "memory); the default table fits 80 columns.")
@click.option("--step", is_flag=True,
              help="The headline: peak memory of a whole training step with AdamW (SFT, "
                   "checkpointing, exact mode, revffn, revnet and each part switched off); "
                   "also takes the presets mixtral-shaped, qwen1.5-moe-shaped, "
                   "deepseek-v3-shaped.")
@click.option("--hidden", type=int, default=None,
              help="--step: narrow a preset to this hidden size (widths scale with it).")
@click.option("--vocab", type=int, default=None, help="--step: override the vocabulary.")
@click.option("--isolate", is_flag=True,
              help="--step on CPU: each method in its own process, with its peak RSS.")
def bench_command(model_dir: str | None, synthetic: str | None, layers: str, batch: int,
                  seq: int, repeats: int, warmup: int, methods: str, device: str, dtype: str,
                  threads: int | None, memory: bool, json_path: str | None,
                  plot_path: str | None, wide: bool, step: bool = False,
                  hidden: int | None = None, vocab: int | None = None,
                  isolate: bool = False) -> None:
    """Measure a training step: no checkpointing, activation checkpointing, revffn, revnet.

    Give MODEL_DIR (a local Hugging Face model directory) or --synthetic NAME. For each
    depth and method: bytes saved for backward, peak live tensor bytes of the step
    (parameters included), the same peak with gradients freed as they arrive, median step
    time, tokens/s and on CUDA torch.cuda.max_memory_allocated; ratios to checkpointing.
    The table shows the main columns (80 characters); --wide, --json or --plot have all.
    Progress goes to stderr: a bar in a terminal, one line per cell otherwise.

    \b
    Example:
      revffn bench --synthetic mixtral-like --layers 4,8 --json out.json --plot out.png
    """
    if (model_dir is None) == (synthetic is None):
        raise RevFFNError("give either MODEL_DIR or --synthetic NAME (exactly one)")
    if plot_path:
        import importlib.util

        # a missing optional dependency is found before the run, not after it
        if importlib.util.find_spec("matplotlib") is None:
            raise RevFFNError("--plot needs matplotlib: pip install 'revffn-fx[bench]'")
    if step:
        return step_command(model_dir, synthetic, layers, batch, seq, repeats,
                            None if methods == ",".join(METHODS) else methods, device, dtype,
                            threads, json_path, plot_path, hidden, vocab, isolate)
    _check_bench_input(model_dir, synthetic, layers, methods)
    import torch

    if threads:
        torch.set_num_threads(threads)
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    source: Any
    if synthetic is not None:
        source = synthetic_factory(synthetic, parse_dtype(dtype))
        depths = parse_depths(layers)
    else:
        source, depths = model_dir, [0]
    with progress_reporter("bench") as progress:
        result = run_bench(source, depths, batch, seq, wanted, repeats, warmup, progress,
                           device=device, memory=memory,
                           dtype=dtype if synthetic is None and dtype != "float32" else None)
    _print_result(result, wide, json_path, plot_path)


def _check_bench_input(model_dir: str | None, synthetic: str | None, layers: str,
                       methods: str) -> None:
    """The cheap checks before torch and transformers are imported (seconds)."""
    if synthetic is not None and synthetic not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                          f"{', '.join(SYNTHETIC)}")
    if model_dir is not None:
        check_model_dir(model_dir)
    unknown = [m.strip() for m in methods.split(",")
               if m.strip() and m.strip() not in METHODS + EXTRA_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(METHODS + EXTRA_METHODS)}")
    if synthetic is not None:
        parse_depths(layers)


def _print_result(result: Any, wide: bool, json_path: str | None,
                  plot_path: str | None) -> None:
    """The table (80 columns in a pipe, 200 with --wide), the errors, JSON and plot."""
    from rich.console import Console

    width = None if sys.stdout.isatty() else (200 if wide else 80)
    Console(width=width, highlight=False).print(result.table(wide))
    for line in result.errors():
        click.echo(line)
    if json_path:
        result.to_json(json_path)
    if plot_path:
        result.plot(plot_path)


# ------------------------------------------------------------------------------ bench --step

def _progress(done: int, total: int, what: str) -> None:
    """One line per method on stderr (stdout keeps the table)."""
    print(f"bench --step: {done}/{total} {what}", file=sys.stderr, flush=True)


def step_command(model_dir: str | None, synthetic: str | None, layers: str, batch: int,
                 seq: int, repeats: int, methods: str | None, device: str, dtype: str,
                 threads: int | None, json_path: str | None, plot_path: str | None,
                 hidden: int | None, vocab: int | None, isolate: bool) -> None:
    """``revffn bench --step``: one table per depth; JSON and a peak-vs-depth plot."""
    import warnings

    from rich.console import Console

    wanted = [m.strip() for m in (methods or ",".join(DEFAULT_STEP_METHODS)).split(",")
              if m.strip()]
    unknown = [m for m in wanted if m not in STEP_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(STEP_METHODS)}")
    depths: list[int | None] = [None] if model_dir is not None else parse_depths(layers)
    # the cheap checks before torch and transformers are imported
    if synthetic is not None and synthetic not in PRESETS and synthetic not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                          f"{', '.join([*PRESETS, *SYNTHETIC])}")
    if hidden is not None and (hidden < 16 or hidden % 16):
        raise RevFFNError(f"--hidden must be a positive multiple of 16, got {hidden}")
    torch_dtype = parse_dtype(dtype)
    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*traceable wrapper-subclass.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")
    results = []
    for depth in depths:
        config, label = source_config(model_dir, synthetic, depth, hidden, vocab,
                                      max(8192, seq))
        results.append(run_step_bench(config, batch, seq, wanted, torch_dtype, device,
                                      repeats, isolate=isolate, label=label,
                                      progress=_progress))
    width = None if sys.stdout.isatty() else 80
    console = Console(width=width, highlight=False)
    for res in results:
        console.print(res.table())
        for r in res.rows:
            if not r.error:
                console.print(f"  {r.method}: {r.label}", highlight=False)
    if json_path:
        Path(json_path).write_text(json.dumps({"results": [asdict(r) for r in results]},
                                              indent=2) + "\n")
    if plot_path:
        plot_sweep(results, "layers", plot_path)
