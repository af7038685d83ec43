"""What the ``revffn`` commands share: click's context settings, the syntax check of a
``--layers`` SPEC, and the commands' option groups as decorators (in the order ``--help``
lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from revffn_fx import couplings
from revffn_fx.couplings.bdia import GAMMAS as BDIA_GAMMAS
from revffn_fx.errors import RevFFNError
from revffn_fx.options import parse_layer_spec

#: every command: -h as well as --help, help text up to 100 columns
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

F = TypeVar("F", bound=Callable[..., Any])


def options(*decorators: Callable[[Any], Any]) -> Callable[[F], F]:
    """One decorator applying ``decorators`` as if stacked in this order (the first is the
    first option ``--help`` lists)."""
    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


def check_layer_spec(spec: str | None) -> None:
    """The syntax of a --layers SPEC ('0-3,6'), before the heavy imports; the range is
    checked against the model later."""
    if spec is None:
        return
    try:
        parse_layer_spec(spec)
    except RevFFNError as e:
        raise click.BadParameter(str(e), param_hint="'--layers'") from None


# ------------------------------------------------------------------------------------ transform

#: transform: the coupling and its settings
coupling_options = options(
    click.option("--coupling", type=click.Choice(couplings.NAMES),
                 default="revffn", show_default=True,
                 help="; ".join(f"{c.name}: {c.summary}" for c in couplings.REGISTRY.values())
                 + " (docs/quality.md)."),
    click.option("--bdia-gamma", type=click.Choice([f"{g:g}" for g in BDIA_GAMMAS]), default=None,
                 help="bdia: |gamma|, the weight of the layer before (default 0.0625; stores "
                      "log2(1/gamma) bits per element per layer)."),
    click.option("--momentum", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 default=None, metavar="G",
                 help="momentum / meft: the fraction of the overwritten stream each update "
                      "keeps (default 0.125); smaller is closer to the pretrained model, and "
                      "the backward's inverse divides by it."),
    click.option("--exact-streams/--no-exact-streams", default=None,
                 help="Float64 streams on a fixed-point grid with the bits each division by G "
                      "drops stored: exact reconstruction at any depth (G must be 2**-k). "
                      "Default: on for momentum / meft, off for the others; "
                      "--no-exact-streams is refused where float streams would make the "
                      "backward less exact than autograd."),
    click.option("--guard", type=click.Choice(["raise", "warn", "off"]), default="raise",
                 show_default=True,
                 help="The run-time reconstruction guard: each layer's reconstructed input is "
                      "compared with a fingerprint of its forward input; raise (stop with "
                      "ReconstructionError naming the layer), warn, or off."),
    click.option("--token-chunk", type=click.IntRange(min=0), default=4096, show_default=True,
                 metavar="TOKENS",
                 help="Run the MoE blocks and MLPs on at most this many tokens (batch x "
                      "sequence) at a time, each chunk checkpointed in the backward's "
                      "recompute: at long context the MoE dispatch, not the stored "
                      "boundaries, is the backward's peak; 0: never chunk."),
)

#: transform: checking and writing OUT_DIR
output_options = options(
    click.option("--verify/--no-verify", default=False, show_default=True,
                 help="Load the weights and check the generated backward against autograd on a "
                      "small batch before writing."),
    click.option("--force", is_flag=True,
                 help="Replace a non-empty OUT_DIR that revffn-fx wrote (its .revffn-fx marker, "
                      "nothing else in it)."),
    click.option("--force-foreign", is_flag=True,
                 help="Replace a non-empty OUT_DIR even if revffn-fx did not write it (its files "
                      "are deleted)."),
    click.option("--allow-nonfinite", is_flag=True,
                 help="Write weights holding NaN or Inf (refused by default, naming the tensor)."),
    click.option("--dry-run", is_flag=True, help="Analyze and report, write nothing."),
    click.option("--max-shard-size", default="2GB", show_default=True, metavar="SIZE",
                 help="Largest safetensors shard written (e.g. 500MB, 2GB); larger models are "
                      "sharded with an index."),
)

#: transform: the cross-branch attention and its fixed point
cross_attention_options = options(
    click.option("--attention", type=click.Choice(["plain", "cross"]), default="plain",
                 show_default=True,
                 help="cross: the paper's cross-branch attention (queries from X1, keys/values "
                      "from X2), inverted by fixed-point iteration; revffn only."),
    click.option("--fixed-point-iters", type=click.IntRange(min=1), default=None,
                 help="Most fixed-point iterations per layer in backward (--attention cross; "
                      "default 50, 200 for fp64 models)."),
    click.option("--fixed-point-tol", type=float, default=None,
                 help="Relative residual at which the fixed point stops (default by dtype: "
                      "1e-6 fp32, 1e-11 fp64, 1e-2 16-bit)."),
)

#: transform: fitting the revffn adapters on text
calibration_options = options(
    click.option("--calibrate", "calibrate", metavar="FILE", default=None,
                 help="Fit the revffn adapters by least squares so each coupled layer "
                      "reproduces its pretrained layer on this text (.txt, or .jsonl with "
                      "'text' or 'prompt'/'completion'); use text like your fine-tuning data. "
                      "Loads the model for real."),
    click.option("--calibration-tokens", type=click.IntRange(min=2), default=16384,
                 show_default=True, help="Tokens of --calibrate FILE used."),
)

#: transform: the sizes the report's activation estimate assumes
estimate_options = options(
    click.option("--estimate-batch", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Batch size the report's activation estimate assumes (nothing else)."),
    click.option("--estimate-seq", type=click.IntRange(min=1), default=2048, show_default=True,
                 help="Sequence length the report's activation estimate assumes."),
)

#: every option of ``revffn transform`` / ``revffn-transform``
transform_options = options(
    coupling_options,
    click.option("--layers", "layers", metavar="SPEC", default=None,
                 help="Decoder layers to convert, e.g. '0-11' or '0,2,4' (default: every "
                      "convertible layer)."),
    output_options,
    cross_attention_options,
    calibration_options,
    click.option("--stream-dtype", type=click.Choice(["auto", "float64", "float32", "int32"]),
                 default="auto", show_default=True,
                 help="Dtype of the coupled streams inside the reversible stacks (branches still "
                      "compute in the model's dtype). auto: one step wider than the hidden "
                      "state at run time (bf16 -> fp32, fp32 -> fp64); with exact streams "
                      "(momentum, meft, bdia) int32 units of 2**-16 for 16-bit models (4 "
                      "bytes) and float64 for fp32; the same rule as rf.transform. int32: "
                      "exact streams in 4 bytes for any model (|stream| < 16384, else a "
                      "step retries in float64). 16-bit streams are refused (the backward "
                      "would be less exact than autograd)."),
    estimate_options,
)

# --------------------------------------------------------------------------------------- verify

#: verify: the random input and what is checked
verify_options = options(
    click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
                 help="Batch size of the random input."),
    click.option("--seq", type=click.IntRange(min=1), default=16, show_default=True,
                 help="Sequence length of the random input."),
    click.option("--seed", type=int, default=0, show_default=True,
                 help="Seed of the random input ids and of the model's randomness."),
    click.option("--router/--no-router", default=False, show_default=True,
                 help="Include the load-balancing (router) loss in the checked gradients."),
    click.option("--no-check", is_flag=True,
                 help="Load without checking config.json, the shim and the weights against the "
                      "sha256 record (a missing or broken record is otherwise refused)."),
)

# ----------------------------------------------------------------------------------------- diff

#: diff: the coupling, the layer shown and the output
diff_options = options(
    click.option("--coupling", type=click.Choice([c.name for c in couplings.REGISTRY.values()
                                                   if c.converts]),
                 default="revffn", show_default=True, help="The coupling to transform with."),
    click.option("--layer", type=click.IntRange(min=0), default=None,
                 help="The decoder layer to show (default: the first convertible one)."),
    click.option("--format", "fmt", type=click.Choice(["text", "html"]), default="text",
                 show_default=True, help="A terminal listing or one self-contained HTML page."),
    click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=str), default=None,
                 help="Write to this file instead of stdout."),
    click.option("--per-pass", is_flag=True, help="One diff per recorded pass, in order."),
    click.option("--context", type=int, default=3, show_default=True,
                 help="Unchanged nodes shown around each change in text (-1: all)."),
)

# ----------------------------------------------------------------------------------------- plan

#: plan: the GPU, the step, the layers and the table
plan_options = options(
    click.option("--gpu-mem", default="80GB", show_default=True, metavar="SIZE",
                 help="Memory of the GPU to fit in (80GB, 24GiB, ...)."),
    click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
                 help="Sequences per training step."),
    click.option("--seq", type=click.IntRange(min=1), default=4096, show_default=True,
                 help="Tokens per sequence."),
    click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw",
                 show_default=True, help="Optimizer whose states are counted."),
    click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
                 help="Training dtype (default: the config's)."),
    click.option("--layers", "layers", metavar="SPEC", default=None,
                 help="Decoder layers the reversible methods convert, as in revffn-transform "
                      "(default: all)."),
    click.option("--wide", is_flag=True,
                 help="One column per category (params, grads, optimizer states, activations, "
                      "of them the coupling's streams and stored bits, loss head) and the full "
                      "method names; needs about 140 columns."),
    click.option("--longest", is_flag=True,
                 help="Instead: the longest sequence at --batch whose planned peak fits in "
                      "--gpu-mem, per method (a binary search over the same estimate; --seq "
                      "is not read)."),
)
