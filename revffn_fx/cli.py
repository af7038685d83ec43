"""Command line: ``revffn`` (transform, inspect, verify, diff, plan, bench, export-original)
and ``revffn-transform``.

A thin layer over the library: parse arguments, call library functions, print. This module
holds the ``revffn`` group, the ``revffn-transform`` entry point and the commands transform,
inspect, verify and plan; the other commands have a module each (:mod:`revffn_fx.cli_diff`,
:mod:`revffn_fx.cli_bench`, :mod:`revffn_fx.cli_export`), the option groups and click
settings are in :mod:`revffn_fx.cli_options`, the tables inspect and plan print in
:mod:`revffn_fx.cli_tables`. Exit statuses are decided in one place
(:mod:`revffn_fx.exits`): 0 success; 2 bad input or a check that failed (any
:class:`revffn_fx.errors.RevFFNError`, or a usage error), one line on stderr; 1 anything
else, which is a bug (set ``REVFFN_DEBUG=1`` for the full traceback).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from revffn_fx import __version__
from revffn_fx.cli_bench import bench_command
from revffn_fx.cli_diff import diff_command
from revffn_fx.cli_export import export_original_command
from revffn_fx.cli_options import (
    CONTEXT,
    check_layer_spec,
    plan_options,
    transform_options,
    verify_options,
)
from revffn_fx.cli_tables import (
    PLAN_NOTE,
    facts_table,
    layers_table,
    longest_table,
    plan_table,
    stack_notes,
)
from revffn_fx.errors import RevFFNError
from revffn_fx.exits import EXIT_HELP, Command, Group
from revffn_fx.options import TransformOptions  # torch-free, like check_out_dir
from revffn_fx.outdir_refusals import check_out_dir
from revffn_fx.output import check_model_dir as _check_model_dir
from revffn_fx.output import parse_bytes, progress_reporter

_WIDTH = 120  # rich's width when the output is not a terminal: stable for pipes and tests


class VerificationFailed(RevFFNError):
    """``revffn verify`` found errors above tolerance."""


def _console(stderr: bool = False, wide: bool = False) -> Console:
    """A rich console; a fixed width when not writing to a terminal (wider when the user
    asked for ``--wide`` output, so a pipe gets every column whole)."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, width=None if tty else (2 * _WIDTH if wide else _WIDTH),
                   highlight=False, soft_wrap=False)


# ------------------------------------------------------------------------------------ transform

@click.command("transform", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
               short_help="Rewrite a model dir into reversible layers.")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@transform_options
@click.version_option(__version__, "-V", "--version", prog_name="revffn-transform")
def transform(model_dir: str, out_dir: str, coupling: str, bdia_gamma: str | None,
              momentum: float | None,
              exact_streams: bool | None, guard: str, layers: str | None, verify: bool,
              force: bool, dry_run: bool, max_shard_size: str, attention: str,
              fixed_point_iters: int | None, fixed_point_tol: float | None,
              calibrate: str | None, calibration_tokens: int, stream_dtype: str,
              estimate_batch: int, estimate_seq: int, force_foreign: bool = False,
              allow_nonfinite: bool = False, token_chunk: int = 4096) -> None:
    """Transform the MoE causal LM in MODEL_DIR into reversible layers, written to OUT_DIR.

    MODEL_DIR is a local Hugging Face model directory (config.json and safetensors
    weights); nothing is downloaded and MODEL_DIR is never modified. OUT_DIR receives the
    weights (safetensors, sharded above --max-shard-size), a config.json with a "revffn"
    section and an auto_map, the tokenizer files and a model card. OUT_DIR is written in a
    temporary directory beside it and renamed at the end; a non-empty OUT_DIR is refused
    unless --force. Progress per shard goes to stderr: a bar in a terminal, plain lines
    otherwise.

    \b
    Examples:
      revffn-transform examples/tiny-mixtral /tmp/tiny-mixtral-rev --verify
      revffn-transform examples/tiny-moe-stdlib /tmp/rev \\
          --calibrate examples/data/train.jsonl --verify
    """
    _check_model_dir(model_dir)  # before the heavy imports: bad input is answered at once
    check_layer_spec(layers)
    if fixed_point_tol is not None and not 0 < fixed_point_tol < float("inf"):
        raise click.BadParameter(f"must be a positive number, not {fixed_point_tol}",
                                 param_hint="'--fixed-point-tol'")
    # every option checked now, before the heavy imports: bad input is answered at once
    options = TransformOptions(coupling=coupling, layers=layers, attention=attention,
                               fixed_point_iters=fixed_point_iters,
                               fixed_point_tol=fixed_point_tol, stream_dtype=stream_dtype,
                               momentum=momentum, exact_streams=exact_streams, guard=guard,
                               token_chunk=token_chunk,
                               bdia_gamma=None if bdia_gamma is None else float(bdia_gamma))
    check_out_dir(Path(out_dir).expanduser(), force, Path(model_dir).expanduser(),
                  force_foreign=force_foreign)
    from revffn_fx.export import transform_dir  # lazy: the heavy part of the package

    with progress_reporter("shards") as progress:
        summary = transform_dir(model_dir, out_dir, options=options, verify=verify,
                                force=force, dry_run=dry_run, max_shard_size=max_shard_size,
                                progress=progress, calibrate=calibrate,
                                calibration_tokens=calibration_tokens,
                                estimate_batch=estimate_batch, estimate_seq=estimate_seq,
                                force_foreign=force_foreign, allow_nonfinite=allow_nonfinite)
    for line in summary.lines():
        click.echo(line)


# -------------------------------------------------------------------------------------- inspect

@click.command("inspect", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
               short_help="What the analysis finds in each layer.")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan as JSON (model facts, summary, layers) and nothing else.")
def inspect(model_dir: str, as_json: bool) -> None:
    """Analyze the model in MODEL_DIR: the residual sublayers of every decoder layer.

    Loads the local model directory, traces it with torch.fx and prints the model's facts,
    a table (layer, sublayers with their kind and modules, residual form and scale,
    convertible or the reason why not) and a one-line summary. Nothing is written.

    \b
    Examples:
      revffn inspect examples/tiny-mixtral
      revffn inspect examples/tiny-mixtral --json | jq .summary
    """
    _check_model_dir(model_dir)
    from revffn_fx import analyze, load_model, trace

    plan = analyze(trace(load_model(model_dir)))
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2, default=str))
        return
    console = _console()
    console.print(Text(f"{model_dir}", style="bold"))
    console.print(facts_table(plan.model))
    console.print()
    console.print(layers_table(plan))
    click.echo(plan.summary())


# --------------------------------------------------------------------------------------- verify

def _load_rev(out_dir: str, check_files: bool = True) -> Any:
    """``rf.load(out_dir)``: from the export module (or the package, once re-exported)."""
    try:
        from revffn_fx.export import load
    except ImportError:  # pragma: no cover - depends on the export module's state
        import revffn_fx

        load = getattr(revffn_fx, "load", None)
        if load is None:
            raise
    return load(out_dir, check_files=check_files)


@click.command("verify", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
               short_help="Check a transformed dir's generated backward.")
@click.argument("out_dir", type=click.Path(path_type=str))
@verify_options
def verify(out_dir: str, batch: int, seq: int, seed: int, router: bool,
           no_check: bool = False) -> None:
    """Check a transformed model in OUT_DIR: is its generated backward exact?

    Loads OUT_DIR (written by revffn-transform) with rf.load and runs one training step on
    random token ids three ways: through the reversible layers (the generated backward),
    through ordinary autograd in the model's dtype, and through ordinary autograd of a
    float64 copy of the same function (the reference). Passes when the generated backward's
    gradient error against the reference is at most max(1.5 x autograd's, autograd's +
    slack), slack 0.02 in 16-bit, 1e-4 in fp32, 1e-9 in fp64; then checks that each
    reversible layer's inverse (the runtime's own) reconstructs its input. Prints the
    summary and the per-layer reconstruction errors; exits 2 when a check fails.

    \b
    Example:
      revffn verify /tmp/tiny-mixtral-rev --batch 2 --seq 32
    """
    _check_model_dir(out_dir)
    import torch

    from revffn_fx import verify as run_verify

    rev = _load_rev(out_dir, check_files=False) if no_check else _load_rev(out_dir)
    vocab = int(getattr(rev.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise RevFFNError(f"{out_dir}: config.json has no vocab_size; cannot make input ids")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    report = run_verify(rev, input_ids, output_router_logits=router, seed=seed)
    console = _console()
    table = Table(title="reconstruction per reversible layer", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("module")
    table.add_column("relative error", justify="right")
    table.add_column("ok")
    for check in report.layers:
        good = check.reconstruction_err <= report.recon_tol
        table.add_row(str(check.index), Text(check.qualname), f"{check.reconstruction_err:.2e}",
                      Text("yes", style="green") if good else Text("no", style="red"))
    console.print(table)
    click.echo(f"loss {report.loss:.4f}; embedding gradient relative error "
               f"{report.embedding_grad_rel_err:.2e}")
    click.echo(report.summary())
    if not report.ok:
        raise VerificationFailed(f"{out_dir}: verification failed: {report.summary()}")


# ----------------------------------------------------------------------------------------- plan

@click.command("plan", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
               short_help="Estimate whether fine-tuning fits a GPU.")
@click.argument("model_dir", type=click.Path(path_type=str))
@plan_options
def plan(model_dir: str, gpu_mem: str, batch: int, seq: int, optimizer: str,
         dtype: str | None, layers: str | None, wide: bool, longest: bool) -> None:
    """Estimate the peak memory of full fine-tuning MODEL_DIR, by category and method.

    Reads only config.json (no weights), so it answers for checkpoints of any size. For
    plain fine-tuning, gradient checkpointing, the reversible stack and the reversible
    stack with the lean loss head, each with an ordinary optimizer and with the optimizer
    fused into the backward, it prints the model state (parameters, gradients, optimizer
    states), the activations (loss head included) at the step's peak, the total, and
    whether it fits in --gpu-mem; --wide splits every category. Rows: every coupling
    (revffn, revnet, momentum, meft: their streams and stored bits are listed below the
    table), the exact mode, and the exact mode with its saved tensors offloaded to the host.
    --longest answers the long-context question instead: the longest --seq at --batch that
    fits, per method. Estimates, not measurements: see docs/benchmarks.md for how close
    they come.

    \b
    Examples:
      revffn plan examples/tiny-mixtral --gpu-mem 24GiB --batch 4 --seq 2048
      revffn plan examples/tiny-mixtral --gpu-mem 80GB --batch 1 --longest
    """
    try:
        budget = parse_bytes(gpu_mem)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--gpu-mem'") from None
    _check_model_dir(model_dir)
    check_layer_spec(layers)
    from revffn_fx.frontend.loading import load_config
    from revffn_fx.model import parse_layers
    from revffn_fx.tools.memory_plan import memory_plan

    config = load_config(model_dir)
    n = int(getattr(config, "num_hidden_layers", 0) or 0)
    selected = parse_layers(layers, n) if layers is not None else None
    if longest:
        _plan_longest(config, model_dir, gpu_mem, budget, batch, optimizer, dtype, selected)
        return
    rows = memory_plan(config, batch, seq, optimizer, dtype, selected)
    title = (f"{model_dir}: batch {batch} x seq {seq}, {optimizer}, peak of one step; fits: "
             f"in {gpu_mem}")
    if selected is not None:
        title += f", layers {layers} reversible"
    console = _console(wide=wide)
    console.print(plan_table(rows, title, budget, wide))
    if not wide:
        click.echo(PLAN_NOTE)
    for line in stack_notes(rows):
        click.echo(line)


def _plan_longest(config: Any, model_dir: str, gpu_mem: str, budget: int, batch: int,
                  optimizer: str, dtype: str | None, selected: Any) -> None:
    """``revffn plan --longest``: per method, the longest sequence that fits."""
    from revffn_fx.tools.memory_plan import longest

    found = longest(config, batch, budget, optimizer, dtype, selected)
    _console().print(longest_table(found, f"{model_dir}: longest sequence at batch {batch} "
                                          f"within {gpu_mem}, {optimizer}", batch))


@click.group("revffn", cls=Group, context_settings=CONTEXT, epilog=EXIT_HELP)
@click.version_option(__version__, "-V", "--version", prog_name="revffn")
def main() -> None:
    """revffn-fx: rewrite Hugging Face MoE causal LMs into reversible couplings.

    \b
    Examples:
      revffn inspect examples/tiny-mixtral
      revffn plan examples/tiny-mixtral --gpu-mem 24GiB
      revffn transform examples/tiny-mixtral /tmp/tiny-mixtral-rev
      revffn verify /tmp/tiny-mixtral-rev
      revffn diff examples/tiny-mixtral --layer 1
      revffn bench --synthetic tiny --layers 2,4
    """


main.add_command(transform)
main.add_command(inspect)
main.add_command(verify)
main.add_command(diff_command)
main.add_command(plan)
main.add_command(bench_command)
main.add_command(export_original_command)

#: ``revffn-transform``: the transform command on its own.
transform_main = transform


if __name__ == "__main__":
    main()
