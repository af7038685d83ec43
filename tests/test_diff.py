"""Graph diffs (``revffn_fx.diffs``): what the transform and user passes change.

The layer diff of a Mixtral layer must list exactly the residual additions as removed and
the split / adapter / coupling / merge nodes as added; the model diff must show the decoder
layers fused into one reversible stack; the HTML page must be self-contained (and, where
Chromium is installed, render to a non-blank screenshot); the custom-pass example must run
and show its effect in its own diff.
"""

from __future__ import annotations

import importlib.util
import operator
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx
from click.testing import CliRunner
from torch.fx import traceback as fx_traceback
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.diffs import (
    GraphDiff,
    diff,
    render_html,
    sample_inputs,
    transform_diffs,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-mixtral"


_REVS: dict[str, rf.RevModel] = {}


def rev_for(coupling: str) -> rf.RevModel:
    """A transformed tiny Mixtral (2 layers), compiled, built once per coupling."""
    if coupling not in _REVS:
        r = rf.transform(tiny_model("mixtral"), coupling=coupling)
        r.specs()
        r.graph()
        _REVS[coupling] = r
    return _REVS[coupling]


@pytest.fixture(scope="module")
def rev() -> rf.RevModel:
    return rev_for("revffn")


def names(nodes: Any) -> set[str]:
    return {n.name for n in nodes}


def layer_diff(rev: rf.RevModel, example: bool = False) -> GraphDiff:
    """Layer 0: the traced graph against its coupling, shapes from a 1 x 8 input."""
    inputs = sample_inputs(rev)[1][0] if example else None
    return diff(rev.traced.layers[0].graph_module, rev.specs()[0].forward, inputs)


# --------------------------------------------------------------------------- layer diff

@pytest.mark.parametrize("coupling", ["revffn", "revnet"])
def test_layer_diff_lists_residual_adds_removed_and_coupling_nodes_added(coupling: str) -> None:
    r = rev_for(coupling)
    lg = r.traced.layers[0]
    d = diff(lg.graph_module, r.specs()[0].forward)
    plan = r.plan.layers[0]
    residual_adds = {s.add_node for s in plan.sublayers}

    # removed: exactly the residual additions
    assert names(d.removed) == residual_adds
    assert all(n.target is operator.add for n in d.removed)
    # added: only nodes the coupling pass made, of the expected kinds
    tags = sorted(n.meta.get("revffn") for n in d.added)
    expected = ["coupling"] * 2 + ["merge"] + ["split"] * 3
    if coupling == "revffn":
        expected += ["adapter"] * 4
    assert tags == sorted(expected)
    # nothing else: the branches only get new inputs (at their entry) and the output a new
    # value; the unused second output of the attention is dropped, listed apart
    assert {p.before.name for p in d.rewired} == {
        "layer_input_layernorm", "layer_post_attention_layernorm", "output"}
    # the MoE call now goes through the token-chunked wrapper of the same module
    assert [(p.before.name, p.after.target) for p in d.changed] == [
        ("layer_mlp", "revffn_chunked_mlp")]
    assert all(not n.users for n in d.dead)
    # every copied branch node is matched to the node it came from
    for a, b in d.matched.items():
        if "from_node" in a.meta:
            assert a.meta["from_node"] == b.name

    text = d.to_text()
    assert "- add = hidden_states + getitem" in text
    assert "+ add = getitem + " in text  # the coupling update of the first stream
    assert "~ layer_input_layernorm = input_layernorm(" in text
    assert "@@ " in text.splitlines()[2]


def test_shapes_from_an_example_input(rev: rf.RevModel) -> None:
    d = layer_diff(rev, example=True)
    by_name = {n.name: n for n in d.after.nodes}
    assert d.info[by_name["getitem"]]["shape"] == "[1, 8, 32] f32"  # half of hidden 64
    assert d.info[by_name["merge_halves"]]["shape"] == "[1, 8, 64] f32"
    assert d.info[by_name["adapters_f_up"]]["module"] == "Linear"
    assert "[1, 8, 32] f32" in d.to_text()


# --------------------------------------------------------------------------- model diff

def test_model_diff_fuses_decoder_layers_into_a_reversible_stack(rev: rf.RevModel) -> None:
    d = diff(rev.traced.graph_module, rev.graph_module)
    layer_nodes = {n.name for n in rev.traced.graph_module.graph.nodes
                   if n.op == "call_module" and n.target.startswith("model.model.layers.")}
    assert len(layer_nodes) == 2
    assert [n.meta.get("revffn") for n in d.added] == ["stack"]
    stack = d.added[0]
    assert names(d.removed) == layer_nodes
    assert names(d.replaces[stack]) == layer_nodes
    assert names(p.after for p in d.rewired) == {"model_model_norm"}
    assert d.changed == [] and d.dead == []
    text = d.to_text()
    assert f"+ {stack.name} = {stack.target}(" in text
    assert "replaces model_model_layers_0, model_model_layers_1" in text


def test_transform_diffs_and_per_pass(rev: rf.RevModel) -> None:
    whole = transform_diffs(rev, shapes=False)
    assert [d.titles[1].rsplit(" ", 1)[-1] for d in whole] == ["fuse", "chunk_tokens"]
    per = transform_diffs(rev, layer=1, per_pass=True, shapes=False)
    assert len(per) == len(rev.pass_records["model"]) + len(rev.pass_records["layer1"])
    with pytest.raises(rf.RevFFNError, match="out of range"):
        transform_diffs(rev, layer=7)


# --------------------------------------------------------------------- matching by itself

def test_structural_matching_without_provenance() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + 1) * 2

    def g(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.sigmoid(x + 1)) * 2

    d = diff(fx.symbolic_trace(f), fx.symbolic_trace(g), (torch.ones(3),))
    assert names(d.added) == {"sigmoid"}
    assert d.removed == []
    assert {p.after.name for p in d.rewired} == {"relu"}
    assert d.unchanged == 4  # x, add, mul, output
    assert d.info[next(iter(d.added))]["shape"] == "[3] f32"


def test_fx_transformer_provenance_is_followed(rev: rf.RevModel) -> None:
    """A Transformer pass under preserve_node_meta renames nodes; NodeSource still matches."""

    class Fp32Norms(fx.Transformer):
        def call_module(self, target: str, args: Any, kwargs: Any) -> Any:
            out = super().call_module(target, args, kwargs)
            return out.float() if "layernorm" in target else out

    def fp32_norms(gm: fx.GraphModule) -> fx.GraphModule:
        with fx_traceback.preserve_node_meta():
            return Fp32Norms(gm).transform()

    r = rf.transform(tiny_model("mixtral"), passes=[fp32_norms])
    r.specs()
    names = [rec.name for rec in r.pass_records["layer0"]]
    assert names[-2:] == ["fp32_norms", "chunk_tokens"]  # the user's pass, then chunking
    record = r.pass_records["layer0"][-2]
    d = diff(record.before, record.after)
    assert [n.target for n in d.added] == ["float", "float"]
    assert d.removed == [] and d.changed == []
    assert {p.after.name for p in d.rewired} == {"self_attn", "mlp"}


# ---------------------------------------------------------------------------------- html

def test_html_is_one_self_contained_file(rev: rf.RevModel) -> None:
    page = layer_diff(rev, example=True).to_html()
    low = page.lower()
    for ref in ("http", "<script src", "<link", "@import", "url(http"):
        assert ref not in low
    assert page.count("<svg") == 3  # two graphs and the shared arrow marker
    assert "MixtralRMSNorm" in page and "[1, 8, 32] f32" in page
    assert "adapters_f_up" in page and "<title>" in page


def _png_pixels(path: Path) -> bytes:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def test_html_renders_in_headless_chromium(rev: rf.RevModel, tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed")
    page = tmp_path / "diff.html"
    page.write_text(render_html(transform_diffs(rev), "tiny mixtral"), encoding="utf-8")
    shot = tmp_path / "diff.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=60, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    pixels = _png_pixels(shot)
    assert len(set(pixels)) > 20  # more than a blank page's few values


# -------------------------------------------------------------------- custom pass example

def test_custom_pass_example_runs_and_its_diff_shows_it(capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("custom_pass", ROOT / "examples" /
                                                  "custom_pass.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main([str(EXAMPLE)])
    d: GraphDiff = out["diff"]
    assert {p.before.name for p in d.changed} == {"layer_input_layernorm",
                                                  "layer_post_attention_layernorm"}
    assert all(p.after.target is torch.nn.functional.rms_norm for p in d.changed)
    assert [n.op for n in d.added] == ["get_attr", "get_attr"]
    assert d.removed == []
    assert out["max_err"] < 1e-5
    printed = capsys.readouterr().out
    assert "~ rms_norm = F.rms_norm(" in printed and "was: input_layernorm(" in printed


# --------------------------------------------------------------------------------- cli

def test_cli_diff_text_html_and_errors(tmp_path: Path) -> None:
    from revffn_fx import cli

    runner = CliRunner()
    res = runner.invoke(cli.main, ["diff", str(EXAMPLE), "--layer", "1"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "+ revffn_stack_0 = " in res.output
    assert "+ split_halves = split_halves(hidden_states)" in res.output
    assert "layer 1 (model.layers.1" in res.output

    html_path = tmp_path / "d.html"
    res = runner.invoke(cli.main, ["diff", str(EXAMPLE), "--format", "html", "-o", str(html_path),
                                       "--per-pass"])
    assert res.exit_code == 0, res.output
    # the model graph's passes and layer 1's, the token chunking among them
    assert html_path.read_text().count("<section>") == 3

    res = runner.invoke(cli.main, ["diff", str(EXAMPLE), "--layer", "9"])
    assert res.exit_code == 2
    assert "out of range" in res.output and len(res.output.strip().splitlines()) == 1


def test_diff_takes_what_the_user_holds() -> None:
    """rf.diff(traced, rev): model level by default, one layer with layer=N, on the shipped
    example; a TypeError for anything that is not a model or a graph."""
    model = rf.load_model(EXAMPLE)
    traced = rf.trace(model)
    rev = rf.transform(model)
    d = rf.diff(traced, rev)
    text = d.to_text()
    assert "+ revffn_stack_0" in text and "RevStack" in text
    assert len(d.removed) == len(traced.layers)  # every decoder layer went into the stack
    assert "[1, 8, 64]" in text  # a sample input labelled the shapes
    page = d.to_html()
    assert page.startswith("<!DOCTYPE html>") and "revffn_stack_0" in page
    layer = rf.diff(traced, rev, layer=1)
    assert "split_halves" in layer.to_text() and "layer 1" in layer.titles[1]
    assert {n.name for n in layer.removed} == {"add", "add_1"}  # the residual additions
    # either side may be a GraphModule
    assert len(rf.diff(traced.graph_module, rev).added) == len(d.added)
    with pytest.raises(TypeError, match="TracedModel, a RevModel"):
        rf.diff(traced, model)
    with pytest.raises(ValueError, match="out of range"):
        rf.diff(traced, rev, layer=9)
