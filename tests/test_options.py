"""TransformOptions: one checked value for every option of the transform, recorded whole.

Every field set to a value other than its default survives save -> rf.load (losing an
option on the way is what this guards against); bad values are refused when the value is
built, with the messages the transform always gave.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.errors import ConversionError, RevFFNError
from revffn_fx.options import COUPLINGS, DEFAULT_MOMENTUM, SCALED_COUPLINGS, TransformOptions
from revffn_fx.serialization.layout import recorded_options

FIELDS = {f.name for f in dataclasses.fields(TransformOptions)}

# two transforms that together set every field to a non-default value (cross-branch
# attention is revffn-only, momentum and exact_streams belong to the scaled couplings)
CASES: list[dict[str, Any]] = [
    dict(coupling="revffn", layers=[1, 2], attention="cross", loss_head="original",
         stream_dtype="float64", checkpoint_rest=True, fixed_point_iters=77,
         fixed_point_tol=1e-5, leaf_modules=["MixtralRMSNorm"], guard="warn",
         token_chunk=256),
    dict(coupling="momentum", momentum=0.25, exact_streams=True),
    dict(coupling="bdia", bdia_gamma=0.25),
]


def test_the_cases_cover_every_option() -> None:
    default = TransformOptions()
    changed = {k for case in CASES for k, v in TransformOptions(**case).to_dict().items()
               if v != default.to_dict()[k]}
    assert changed == FIELDS, f"no round trip for {sorted(FIELDS - changed)}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["coupling"])
def test_every_option_survives_save_and_load(case: dict[str, Any], tmp_path: Path) -> None:
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=4), **case)
    want = recorded_options(rev)
    given = TransformOptions(**case)
    for name in case:  # the model holds what it was given
        assert getattr(want, name) == getattr(given, name), name
    rev.save_pretrained(tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["revffn"]
    assert set(section["transform"]) == FIELDS  # every option written, by construction
    assert TransformOptions.from_dict(section["transform"]) == want
    back = rf.load(tmp_path)
    assert recorded_options(back) == want


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(coupling="other"), "unknown coupling 'other'; choose from revffn, revnet"),
    (dict(attention="sideways"), "unknown attention 'sideways'; choose plain or cross"),
    (dict(coupling="revnet", attention="cross"), "cross-branch attention is an option of the "
                                                 "revffn coupling"),
    (dict(loss_head="fast"), "unknown loss head 'fast'; choose chunked or original"),
    (dict(stream_dtype="int8"), "unknown stream dtype 'int8'"),
    (dict(stream_dtype="bfloat16"), "stream dtype bfloat16 is refused: 16-bit streams"),
    (dict(stream_dtype=torch.float16), "leave stream_dtype unset"),
    (dict(coupling="momentum", momentum=0.3), "momentum 0.3 cannot be inverted exactly"),
    (dict(coupling="meft", momentum=0.01), "use momentum=0.0078125"),
    (dict(coupling="meft", momentum=2**-17), "k in 1..16"),
    (dict(guard="maybe"), "unknown guard 'maybe'; choose from raise, warn, off"),
    (dict(coupling="bdia", bdia_gamma=0.3), "bdia_gamma must be one of 0.5, 0.25, 0.125, 0.0625"),
    (dict(coupling="revnet", bdia_gamma=0.5), "bdia_gamma is an option of the bdia coupling"),
    (dict(fixed_point_tol=0.0), "fixed_point_tol must be a positive number, not 0.0"),
    (dict(fixed_point_tol=float("nan")), "fixed_point_tol must be a positive number"),
    (dict(fixed_point_iters=0), "fixed_point_iters must be a positive integer"),
    (dict(momentum=0.5), "momentum is an option of the momentum and meft couplings"),
    (dict(coupling="meft", momentum=1.0), "momentum must be in (0, 1)"),
    (dict(layers="5-2"), "bad layer spec '5-2'"),
    (dict(layers=[0, "1"]), "layers must be layer indices"),
    (dict(leaf_modules="MixtralRMSNorm"), "leaf_modules must be a list of module names"),
])
def test_bad_options_refused_when_built(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(RevFFNError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TransformOptions(**kwargs)


def test_values_normalised_and_frozen() -> None:
    opts = TransformOptions(coupling="meft", layers="0-2,1", stream_dtype=torch.float32,
                            leaf_modules=["A"])
    assert opts.layers == (0, 1, 2) and opts.stream_dtype == "float32"
    assert opts.momentum == DEFAULT_MOMENTUM and opts.leaf_modules == ("A",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.coupling = "revnet"  # type: ignore[misc]
    assert TransformOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(ConversionError, match="unknown transform option 'colour'"):
        TransformOptions.from_dict({"colour": "red"})


def test_the_stream_rule() -> None:
    """One rule, the API's and the CLI's: unset (or "auto") streams are decided at run
    time; exact streams for the scaled couplings unless refused; calibration widens fp32."""
    auto = TransformOptions(stream_dtype="auto")
    assert auto == TransformOptions() and auto.stream_dtype is None
    assert auto.resolved("float32").stream_dtype is None
    assert auto.resolved("float32", calibrating=True).stream_dtype == "float64"
    assert auto.resolved("torch.bfloat16", calibrating=True).stream_dtype is None
    for c in SCALED_COUPLINGS:
        opts = TransformOptions(coupling=c)
        # exact streams' grid: the run-time rule unless asked (runtime/grid.py)
        assert opts.exact_streams and opts.resolved("bfloat16").stream_dtype is None
        assert opts.replace(stream_dtype="float32").resolved("float32").stream_dtype \
            == "float64"
        assert opts.replace(stream_dtype="int32").resolved("float32").stream_dtype == "int32"
        assert not TransformOptions(coupling=c, exact_streams=False).exact_streams
    assert not TransformOptions(coupling="revnet").exact_streams
    assert TransformOptions(coupling="revnet", stream_dtype="int32").exact_streams


def test_inexact_scaled_streams_refused_at_depth() -> None:
    """Without exact streams the inverse divides rounding by g per scaled update: refused
    where that exceeds what autograd keeps, naming the option that would do."""
    model = tiny_model("mixtral", num_hidden_layers=4)
    with pytest.raises(ConversionError, match="use exact_streams=True"):
        rf.transform(model, coupling="momentum", momentum=2**-8, exact_streams=False)
    rf.transform(model, coupling="momentum", momentum=0.5, exact_streams=False)  # 2^8: fine


def test_names_agree_with_the_registry() -> None:
    """One registry (revffn_fx.couplings): the options, the passes and the CLI read it."""
    from revffn_fx import couplings
    from revffn_fx.cli import transform
    from revffn_fx.model import EXACT
    from revffn_fx.passes import couple, couple_momentum

    assert COUPLINGS == couplings.NAMES and EXACT in COUPLINGS
    assert set(couple.COUPLINGS) == {n for n, c in couplings.REGISTRY.items() if c.converts}
    assert set(SCALED_COUPLINGS) == {n for n, c in couplings.REGISTRY.items() if c.scaled}
    assert set(couple_momentum.SCALED_COUPLINGS) <= set(SCALED_COUPLINGS)
    assert DEFAULT_MOMENTUM == couplings.get("momentum").options["momentum"][0]
    choice = next(p for p in transform.params if p.name == "coupling").type
    assert tuple(choice.choices) == couplings.NAMES
    for c in couplings.REGISTRY.values():  # every declared rewrite resolves
        assert c.rewrite is None or callable(c.rewrite_pass())
    assert TransformOptions.build(**CASES[0]) == TransformOptions(**CASES[0])
    with pytest.raises(ConversionError, match="unknown option 'colour'; the transform takes"):
        rf.transform(tiny_model("mixtral"), colour="red")


def test_options_import_without_torch() -> None:
    """The CLI builds the options before the heavy imports."""
    code = ("import sys, revffn_fx.options as o; o.TransformOptions(layers='0-3'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
