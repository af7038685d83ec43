"""``revffn export-original``: a transformed directory's model written back as the original
Hugging Face architecture (couplings that preserve the original function)."""

from __future__ import annotations

from pathlib import Path

import click

from revffn_fx.cli_options import CONTEXT
from revffn_fx.exits import EXIT_HELP, Command
from revffn_fx.outdir_refusals import check_out_dir
from revffn_fx.output import check_model_dir


@click.command("export-original", cls=Command, context_settings=CONTEXT, epilog=EXIT_HELP,
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
    check_model_dir(rev_dir)
    check_out_dir(Path(hf_dir).expanduser(), force, Path(rev_dir).expanduser(),
                  force_foreign=force_foreign)
    from revffn_fx.export.original import export_original

    out = export_original(rev_dir, hf_dir, force=force, force_foreign=force_foreign)
    click.echo(f"wrote {out}: the original architecture with the trained weights")
