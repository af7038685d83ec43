"""``revffn diff``: the graphs the transform changes in a model directory, as a coloured
text listing or one HTML page (:mod:`revffn_fx.diffs`)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.text import Text

from revffn_fx.cli_options import CONTEXT, diff_options
from revffn_fx.exits import EXIT_HELP, Command
from revffn_fx.output import check_model_dir


def _print_diff(text: str) -> None:
    """The text diff in colour: + green, - red, ~ yellow, @ cyan."""
    console = Console(highlight=False, soft_wrap=True)
    styles = {"+": "green", "-": "red", "~": "yellow", "@": "cyan"}
    for line in text.splitlines():
        console.print(Text(line, style=styles.get(line[:1], "")))


@click.command("diff", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
               short_help="Show the graphs the transform changes.")
@click.argument("model_dir", type=click.Path(path_type=str))
@diff_options
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
    check_model_dir(model_dir)
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
