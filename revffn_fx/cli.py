"""Command line: ``revffn`` (transform, inspect, verify, diff, plan, bench) and
``revffn-transform``.

A thin layer over the library: parse arguments, call library functions, print. Exit
statuses are decided in one place (:mod:`revffn_fx.exits`): 0 success; 2 bad input or a check
that failed (any :class:`revffn_fx.errors.RevFFNError`, or a usage error), one line on
stderr; 1 anything else, which is a bug (set ``REVFFN_DEBUG=1`` for the full traceback).
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

from revffn_fx import __version__, couplings
from revffn_fx.cli_bench import bench_command
from revffn_fx.errors import RevFFNError
from revffn_fx.exits import EXIT_HELP, Command, Group
from revffn_fx.output import check_model_dir as _check_model_dir
from revffn_fx.output import human_bytes, parse_bytes, progress_reporter

_WIDTH = 120  # rich's width when the output is not a terminal: stable for pipes and tests
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class VerificationFailed(RevFFNError):
    """``revffn verify`` found errors above tolerance."""


def _console(stderr: bool = False, wide: bool = False) -> Console:
    """A rich console; a fixed width when not writing to a terminal (wider when the user
    asked for ``--wide`` output, so a pipe gets every column whole)."""
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(file=stream, width=None if tty else (2 * _WIDTH if wide else _WIDTH),
                   highlight=False, soft_wrap=False)


def _check_layer_spec(spec: str | None) -> None:
    """The syntax of a --layers SPEC ('0-3,6'), before the heavy imports; the range is
    checked against the model later."""
    if spec is None:
        return
    from revffn_fx.options import parse_layer_spec

    try:
        parse_layer_spec(spec)
    except RevFFNError as e:
        raise click.BadParameter(str(e), param_hint="'--layers'") from None


def _human(n: int | float) -> str:
    """``476736`` -> ``476,736 (0.48M)``."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{unit})"
    return f"{n:,}"


# ------------------------------------------------------------------------------------ transform

@click.command("transform", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
               short_help="Rewrite a model dir into reversible layers.")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--coupling", type=click.Choice(couplings.NAMES),
              default="revffn", show_default=True,
              help="; ".join(f"{c.name}: {c.summary}" for c in couplings.REGISTRY.values())
              + " (docs/quality.md).")
@click.option("--bdia-gamma", type=click.Choice(["0.5", "0.25", "0.125"]), default=None,
              help="bdia: |gamma|, the weight of the layer before (default 0.5; stores "
                   "log2(1/gamma) bits per element per layer).")
@click.option("--momentum", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, metavar="G",
              help="momentum / meft: the fraction of the overwritten stream each update "
                   "keeps (default 0.125); smaller is closer to the pretrained model, and "
                   "the backward's inverse divides by it.")
@click.option("--exact-streams/--no-exact-streams", default=None,
              help="Float64 streams on a fixed-point grid with the bits each division by G "
                   "drops stored: exact reconstruction at any depth (G must be 2**-k). "
                   "Default: on for momentum / meft, off for the others; "
                   "--no-exact-streams is refused where float streams would make the "
                   "backward less exact than autograd.")
@click.option("--guard", type=click.Choice(["raise", "warn", "off"]), default="raise",
              show_default=True,
              help="The run-time reconstruction guard: each layer's reconstructed input is "
                   "compared with a fingerprint of its forward input; raise (stop with "
                   "ReconstructionError naming the layer), warn, or off.")
@click.option("--layers", "layers", metavar="SPEC", default=None,
              help="Decoder layers to convert, e.g. '0-11' or '0,2,4' (default: every "
                   "convertible layer).")
@click.option("--verify/--no-verify", default=False, show_default=True,
              help="Load the weights and check the generated backward against autograd on a "
                   "small batch before writing.")
@click.option("--force", is_flag=True,
              help="Replace a non-empty OUT_DIR that revffn-fx wrote (its .revffn-fx marker, "
                   "nothing else in it).")
@click.option("--force-foreign", is_flag=True,
              help="Replace a non-empty OUT_DIR even if revffn-fx did not write it (its files "
                   "are deleted).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Write weights holding NaN or Inf (refused by default, naming the tensor).")
@click.option("--dry-run", is_flag=True, help="Analyze and report, write nothing.")
@click.option("--max-shard-size", default="2GB", show_default=True, metavar="SIZE",
              help="Largest safetensors shard written (e.g. 500MB, 2GB); larger models are "
                   "sharded with an index.")
@click.option("--attention", type=click.Choice(["plain", "cross"]), default="plain",
              show_default=True,
              help="cross: the paper's cross-branch attention (queries from X1, keys/values "
                   "from X2), inverted by fixed-point iteration; revffn only.")
@click.option("--fixed-point-iters", type=click.IntRange(min=1), default=None,
              help="Most fixed-point iterations per layer in backward (--attention cross; "
                   "default 50, 200 for fp64 models).")
@click.option("--fixed-point-tol", type=float, default=None,
              help="Relative residual at which the fixed point stops (default by dtype: "
                   "1e-6 fp32, 1e-11 fp64, 1e-2 16-bit).")
@click.option("--calibrate", "calibrate", metavar="FILE", default=None,
              help="Fit the revffn adapters by least squares so each coupled layer "
                   "reproduces its pretrained layer on this text (.txt, or .jsonl with "
                   "'text' or 'prompt'/'completion'); use text like your fine-tuning data. "
                   "Loads the model for real.")
@click.option("--calibration-tokens", type=click.IntRange(min=2), default=16384,
              show_default=True, help="Tokens of --calibrate FILE used.")
@click.option("--stream-dtype", type=click.Choice(["auto", "float64", "float32"]),
              default="auto", show_default=True,
              help="Dtype of the coupled streams inside the reversible stacks (branches still "
                   "compute in the model's dtype). auto: one step wider than the hidden "
                   "state at run time (bf16 -> fp32, fp32 -> fp64), float64 with exact "
                   "streams; the same rule as rf.transform. 16-bit streams are refused "
                   "(the backward would be less exact than autograd).")
@click.option("--estimate-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batch size the report's activation estimate assumes (nothing else).")
@click.option("--estimate-seq", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Sequence length the report's activation estimate assumes.")
@click.version_option(__version__, "-V", "--version", prog_name="revffn-transform")
def transform(model_dir: str, out_dir: str, coupling: str, bdia_gamma: str | None,
              momentum: float | None,
              exact_streams: bool | None, guard: str, layers: str | None, verify: bool,
              force: bool, dry_run: bool, max_shard_size: str, attention: str,
              fixed_point_iters: int | None, fixed_point_tol: float | None,
              calibrate: str | None, calibration_tokens: int, stream_dtype: str,
              estimate_batch: int, estimate_seq: int, force_foreign: bool = False,
              allow_nonfinite: bool = False) -> None:
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
    _check_layer_spec(layers)
    if fixed_point_tol is not None and not 0 < fixed_point_tol < float("inf"):
        raise click.BadParameter(f"must be a positive number, not {fixed_point_tol}",
                                 param_hint="'--fixed-point-tol'")
    from revffn_fx.options import TransformOptions  # torch-free, like check_out_dir
    from revffn_fx.outdir import check_out_dir

    # every option checked now, before the heavy imports: bad input is answered at once
    options = TransformOptions(coupling=coupling, layers=layers, attention=attention,
                               fixed_point_iters=fixed_point_iters,
                               fixed_point_tol=fixed_point_tol, stream_dtype=stream_dtype,
                               momentum=momentum, exact_streams=exact_streams, guard=guard,
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

_FACTS = (("model_type", "model type"), ("class", "class"), ("hidden_size", "hidden size"),
          ("num_layers", "layers"), ("num_experts", "experts"), ("parameters", "parameters"),
          ("dtype", "dtype"))


def _facts_table(model: dict[str, Any]) -> Table:
    """The model-level facts from ``plan.model``, known keys first, in a two-column grid."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    labels = dict(_FACTS)
    for key in [k for k, _ in _FACTS if k in model] + [k for k in model if k not in labels]:
        value = model[key]
        shown = _human(value) if key == "parameters" and isinstance(value, int) else str(value)
        grid.add_row(labels.get(key, key.replace("_", " ")), Text(shown))
    return grid


def _plan_table(plan: Any) -> Table:
    """One row per decoder layer: its sublayers, their residual forms, convertible or why not."""
    table = Table(title="decoder layers", title_justify="left", show_lines=True)
    table.add_column("layer", justify="right", no_wrap=True)
    table.add_column("sublayers (kind: modules)")
    table.add_column("residual form", no_wrap=True)
    table.add_column("convertible")
    for lp in plan.layers:
        subs = Text("\n").join(Text(f"{s.kind}: {', '.join(s.modules) or '-'}")
                               for s in lp.sublayers) or Text("(no residual branch)")
        forms = Text("\n").join(
            Text(s.residual_form + (f" (scale {s.scale:g})" if s.scale is not None else ""))
            for s in lp.sublayers) or Text("-")
        verdict = (Text("yes", style="green") if lp.convertible
                   else Text(f"no: {lp.reason}", style="red"))
        if lp.convertible and getattr(lp, "pairing", ""):  # how the updates share the streams
            verdict = Text.assemble(verdict, f"\n{lp.pairing}")
        table.add_row(str(lp.index), subs, forms, verdict)
    return table


@click.command("inspect", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
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
    console.print(_facts_table(plan.model))
    console.print()
    console.print(_plan_table(plan))
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


@click.command("verify", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
               short_help="Check a transformed dir's generated backward.")
@click.argument("out_dir", type=click.Path(path_type=str))
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="Batch size of the random input.")
@click.option("--seq", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sequence length of the random input.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random input ids and of the model's randomness.")
@click.option("--router/--no-router", default=False, show_default=True,
              help="Include the load-balancing (router) loss in the checked gradients.")
@click.option("--no-check", is_flag=True,
              help="Load without checking config.json, the shim and the weights against the "
                   "sha256 record (a missing or broken record is otherwise refused).")
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


# ------------------------------------------------------------------------------ export-original

@click.command("export-original", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
               short_help="A standard checkpoint of the original architecture.")
@click.argument("rev_dir", type=click.Path(path_type=str))
@click.argument("hf_dir", type=click.Path(path_type=str))
@click.option("--force", is_flag=True, help="Replace an HF_DIR that revffn-fx wrote.")
@click.option("--force-foreign", is_flag=True, help="Replace any non-empty HF_DIR.")
def export_original_command(rev_dir: str, hf_dir: str, force: bool,
                            force_foreign: bool) -> None:
    """Write REV_DIR's model as the original Hugging Face architecture into HF_DIR.

    Only for couplings whose trained model is the original architecture: none (the exact
    mode) and bdia (trained with +-gamma of the layer before, evaluated as the original
    layers). HF_DIR is a standard checkpoint (config.json, safetensors, tokenizer files)
    that loads with AutoModelForCausalLM and no revffn-fx, no auto_map.

    \b
    Example:
      revffn-transform examples/tiny-moe-stdlib /tmp/rev --coupling bdia
      revffn export-original /tmp/rev /tmp/hf
    """
    _check_model_dir(rev_dir)
    from revffn_fx.outdir import check_out_dir

    check_out_dir(Path(hf_dir).expanduser(), force, Path(rev_dir).expanduser(),
                  force_foreign=force_foreign)
    from revffn_fx.export.original import export_original

    out = export_original(rev_dir, hf_dir, force=force, force_foreign=force_foreign)
    click.echo(f"wrote {out}: the original architecture with the trained weights")


# ----------------------------------------------------------------------------------------- main

def _print_diff(text: str) -> None:
    console = Console(highlight=False, soft_wrap=True)
    styles = {"+": "green", "-": "red", "~": "yellow", "@": "cyan"}
    for line in text.splitlines():
        console.print(Text(line, style=styles.get(line[:1], "")))


@click.command("diff", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
               short_help="Show the graphs the transform changes.")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--coupling", type=click.Choice([c.name for c in couplings.REGISTRY.values()
                                                if c.converts]),
              default="revffn", show_default=True, help="The coupling to transform with.")
@click.option("--layer", type=click.IntRange(min=0), default=None,
              help="The decoder layer to show (default: the first convertible one).")
@click.option("--format", "fmt", type=click.Choice(["text", "html"]), default="text",
              show_default=True, help="A terminal listing or one self-contained HTML page.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Write to this file instead of stdout.")
@click.option("--per-pass", is_flag=True, help="One diff per recorded pass, in order.")
@click.option("--context", type=int, default=3, show_default=True,
              help="Unchanged nodes shown around each change in text (-1: all).")
def diff_command(model_dir: str, coupling: str, layer: int | None, fmt: str,
                 output: str | None, per_pass: bool, context: int) -> None:
    """Show what the transform changes in MODEL_DIR: the model-level graph and one layer.

    Loads the local model directory, transforms it as ``revffn transform`` would (nothing
    is written), and prints the before/after diff of the model graph (decoder layers fused
    into reversible stacks) and of a decoder layer (residual adds replaced by the coupling).
    Shapes come from running a small example input (1 x 8 tokens).

    \b
    Examples:
      revffn diff examples/tiny-mixtral
      revffn diff examples/tiny-mixtral --format html -o diff.html
      revffn diff examples/tiny-mixtral --per-pass --layer 1
    """
    _check_model_dir(model_dir)
    if output is not None and not Path(output).expanduser().resolve().parent.is_dir():
        raise click.BadParameter(f"{output}: its folder does not exist",
                                 param_hint="'-o' / '--output'")
    from revffn_fx.diffs import render_html, transform_diffs
    from revffn_fx.frontend.loading import load_model
    from revffn_fx.model import transform

    rev = transform(load_model(model_dir), coupling=coupling)
    diffs = transform_diffs(rev, layer, per_pass)
    if fmt == "html":
        page = render_html(diffs, f"revffn diff: {model_dir} ({coupling})")
    else:
        page = "\n\n".join(d.to_text(None if context < 0 else context) for d in diffs)
    if output is not None:
        with open(output, "w", encoding="utf-8") as f:
            f.write(page if page.endswith("\n") else page + "\n")
        click.echo(f"wrote {output}", err=True)
    elif fmt == "text":
        _print_diff(page)
    else:
        click.echo(page, nl=False)


# ----------------------------------------------------------------------------------------- plan

_SHORT = {"plain fine-tuning": "plain", "gradient checkpointing": "checkpointing",
          "reversible (revffn)": "reversible", "reversible + lean loss head":
          "reversible + lean head"}
_PLAN_NOTE = ("model state: parameters + gradients + optimizer states; activations\n"
              "include the loss head; --wide: one column per category; - : none held\n"
              "at that method's peak (e.g. no gradients yet while the loss is computed)")


def _short(method: str) -> str:
    return _SHORT.get(method, method.replace("lean loss head", "lean head"))


def _stack_notes(rows: Any) -> list[str]:
    """One line per coupling (streams and stored bits, inside its activations) and for the
    offloading row (what it keeps on the host), from the fused rows."""
    lines = []
    for r in rows:
        if not r.fused:
            continue
        if r.streams:
            bits = f", stored bits {human_bytes(r.stored_bits)}" if r.stored_bits else ""
            lines.append(f"  {_short(r.method)}: streams {human_bytes(r.streams)}{bits}")
        if r.host:
            lines.append(f"  {_short(r.method)}: {human_bytes(r.host)} on the host")
    return (["of the activations (fused rows):"] + lines) if lines else []


def plan_table(rows: Any, title: str, budget: int, wide: bool = False) -> Table:
    """The `revffn plan` table: each figure in its own unit (never 0.00). Narrow (80
    columns): method, optimizer, model state, activations, total, fits (within ``budget``
    bytes: say which in ``title``); ``wide``: every category in its own column."""
    from rich import box

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, collapse_padding=True)
    heads = ["method", "optimizer"] + (
        ["params", "grads", "optim. states", "activations", "streams", "stored bits",
         "loss head"] if wide else ["model state", "activations"]) + ["total", "fits"]
    for h in heads:
        table.add_column(h, justify="left" if h in ("method", "optimizer") else "right",
                         no_wrap=True)
    for r in rows:
        figures = ([r.parameters, r.gradients, r.optimizer, r.activations, r.streams,
                    r.stored_bits, r.loss_head] if wide
                   else [r.parameters + r.gradients + r.optimizer,
                         r.activations + r.loss_head])
        table.add_row(r.method if wide else _short(r.method),
                      "fused" if r.fused else "ordinary",
                      *(human_bytes(v) if v else "-" for v in figures + [r.total]),
                      "yes" if r.total <= budget else "no")
    return table


@click.command("plan", cls=Command, context_settings=_CONTEXT, epilog=EXIT_HELP,
               short_help="Estimate whether fine-tuning fits a GPU.")
@click.argument("model_dir", type=click.Path(path_type=str))
@click.option("--gpu-mem", default="80GB", show_default=True, metavar="SIZE",
              help="Memory of the GPU to fit in (80GB, 24GiB, ...).")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per training step.")
@click.option("--seq", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens per sequence.")
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw",
              show_default=True, help="Optimizer whose states are counted.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Training dtype (default: the config's).")
@click.option("--layers", "layers", metavar="SPEC", default=None,
              help="Decoder layers the reversible methods convert, as in revffn-transform "
                   "(default: all).")
@click.option("--wide", is_flag=True,
              help="One column per category (params, grads, optimizer states, activations, "
                   "of them the coupling's streams and stored bits, loss head) and the full "
                   "method names; needs about 140 columns.")
@click.option("--longest", is_flag=True,
              help="Instead: the longest sequence at --batch whose planned peak fits in "
                   "--gpu-mem, per method (a binary search over the same estimate; --seq "
                   "is not read).")
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
    _check_layer_spec(layers)
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
        click.echo(_PLAN_NOTE)
    for line in _stack_notes(rows):
        click.echo(line)


def _plan_longest(config: Any, model_dir: str, gpu_mem: str, budget: int, batch: int,
                  optimizer: str, dtype: str | None, selected: Any) -> None:
    """``revffn plan --longest``: per method, the longest sequence that fits."""
    from rich import box

    from revffn_fx.tools.memory_plan import longest

    found = longest(config, batch, budget, optimizer, dtype, selected)
    table = Table(title=f"{model_dir}: longest sequence at batch {batch} within {gpu_mem}, "
                        f"{optimizer}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False, show_edge=False, collapse_padding=True)
    for h in ("method", "optimizer", "longest seq", "tokens/step", "peak there"):
        table.add_column(h, justify="left" if h in ("method", "optimizer") else "right",
                         no_wrap=True)
    for f in found:
        table.add_row(_short(f.method), "fused" if f.fused else "ordinary",
                      f"{f.seq:,}" if f.seq else "none fits",
                      f"{f.seq * batch:,}" if f.seq else "-",
                      human_bytes(f.row.total) if f.row else "-")
    _console().print(table)


@click.group("revffn", cls=Group, context_settings=_CONTEXT, epilog=EXIT_HELP)
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
