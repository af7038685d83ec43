"""The momentum and meft couplings: closed-form inverses that divide by the momentum g,
checked against autograd, and close to the pretrained function at small g."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_core import assert_backward_exact, count_backwards
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.errors import RevFFNError
from revffn_fx.passes.couple_momentum import DEFAULT_MOMENTUM
from revffn_fx.tools.measure_memory import saved_tensor_bytes

SCALED = ["momentum", "meft"]


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("coupling", SCALED)
@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "granitemoe", "hand"])
def test_fp64_gradients_match_autograd(name: str, coupling: str) -> None:
    rev = rf.transform(tiny_model(name, dtype=torch.float64), coupling=coupling)
    assert rev.converted == [0, 1] and rev.momentum == DEFAULT_MOMENTUM
    assert_backward_exact(rev)


def test_updates_keep_a_fraction_of_the_stream() -> None:
    """The inverse generator reads the scale off the graph: momentum has a velocity update
    (scale g, reads X) and a position update (scale 1, reads V) per sublayer; meft one
    update per sublayer, alternating streams."""
    model = tiny_model("mixtral", dtype=torch.float64)
    mom = rf.transform(model, coupling="momentum", momentum=0.25).specs(True)[0]
    assert [(u.target, u.reads, u.scale) for u in mom.updates] == [
        (1, [0], 0.25), (0, [1], 1.0), (1, [0], 0.25), (0, [1], 1.0)]
    meft = rf.transform(model, coupling="meft", momentum=0.25).specs(True)[0]
    assert [(u.target, u.reads, u.scale) for u in meft.updates] == [(0, [1], 0.25),
                                                                     (1, [0], 0.25)]
    assert all(u.closed_form for u in (*mom.updates, *meft.updates))


@pytest.mark.parametrize("coupling", SCALED)
def test_inverse_graph_undoes_the_forward(coupling: str) -> None:
    rev = rf.transform(tiny_model("qwen2_moe", dtype=torch.float64), coupling=coupling,
                       momentum=0.5).eval()
    report = rf.verify(rev, _ids())
    errs = [c.reconstruction_err for c in report.layers]
    assert len(errs) == 2 and all(e <= 1e-13 for e in errs), errs


@pytest.mark.parametrize("coupling", SCALED)
def test_small_momentum_keeps_the_original_function(coupling: str) -> None:
    """At step 0 the coupled model's logits tend to the original's as g -> 0 (revnet's
    are far off): the pretrained function is kept without any fitting."""
    model = tiny_model("mixtral", dtype=torch.float64, num_hidden_layers=4).eval()
    ids = _ids(2, 16)
    with torch.no_grad():
        want = model(ids).logits

        def err(**kw: object) -> float:
            got = rf.transform(model, **kw).eval()(ids, return_logits=True).logits
            return float((got - want).norm() / want.norm())

        far, near = err(coupling=coupling, momentum=0.5), err(coupling=coupling, momentum=2**-10)
        revnet = err(coupling="revnet")
    assert near < 2e-3 * far, (near, far)
    assert near < 1e-3 * revnet, (near, revnet)


def test_wide_streams_carry_the_division_in_fp32() -> None:
    """fp32 model, g = 1/8, four layers (8 divisions by g), exact streams off: with fp64
    streams the generated backward meets the criterion (the fp64 reconstruction error stays
    below fp32 rounding); fp32 streams would amplify rounding by 8^8 and are refused."""
    model = tiny_model("mixtral", num_hidden_layers=4)
    ids = _ids(2, 16)
    wide = rf.verify(rf.transform(model, coupling="momentum", stream_dtype="float64",
                                  exact_streams=False), ids)
    assert wide.ok and wide.max_grad_rel_err <= 1e-6, wide.summary()
    with pytest.raises(RevFFNError, match=r"amplifies rounding by \(1/0.125\)\^8"):
        rf.transform(model, coupling="momentum", stream_dtype="float32", exact_streams=False)


@pytest.mark.parametrize("coupling", SCALED)
def test_trains_and_round_trips(coupling: str, tmp_path: Path) -> None:
    """A few AdamW steps through the generated backward lower the loss; a saved model
    keeps its momentum and computes the same logits after loading."""
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling=coupling,
                       momentum=0.25, stream_dtype="float64").train()
    opt = torch.optim.AdamW(rev.parameters(), lr=3e-3)
    ids = _ids(4, 16)
    losses = []
    with count_backwards() as calls:
        for _ in range(8):
            loss = rev(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert len(calls) == 8 and losses[-1] < losses[0] - 0.05, losses
    rev.save_pretrained(tmp_path)
    back = rf.load(tmp_path)
    assert back.coupling == coupling and back.momentum == 0.25
    rev.eval()
    with torch.no_grad():
        a = rev(ids, return_logits=True).logits
        b = back(ids, return_logits=True).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [0, 1.0, -0.5, "x"])
def test_bad_momentum_is_refused(bad: object) -> None:
    with pytest.raises(RevFFNError, match="momentum"):
        rf.transform(tiny_model("mixtral"), coupling="momentum", momentum=bad)


def test_momentum_is_not_an_option_of_revffn() -> None:
    with pytest.raises(RevFFNError, match="momentum"):
        rf.transform(tiny_model("mixtral"), coupling="revffn", momentum=0.25)


def test_transform_dir_records_momentum_and_widens_streams(tmp_path: Path) -> None:
    """``revffn-transform --coupling momentum --momentum G``: the export records g, and
    exact streams by default (the inverse divides by g), their dtype left to the run-time
    rule (runtime/grid.py: float64 values for these fp32 weights, int32 units in bf16)."""
    from revffn_fx.export import transform_dir

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"
    transform_dir(example, tmp_path / "out", coupling="momentum", momentum=0.25,
                  stream_dtype="auto")
    options = json.loads((tmp_path / "out" / "config.json").read_text())["revffn"]["transform"]
    assert options["momentum"] == 0.25 and options["stream_dtype"] is None
    assert options["exact_streams"] is True
    back = rf.load(tmp_path / "out")
    assert back.coupling == "momentum" and back.momentum == 0.25


@pytest.mark.parametrize("coupling", SCALED)
def test_exact_streams_reconstruct_at_any_depth(coupling: str) -> None:
    """fp32 model, 4 layers, g = 1/256: float64 streams alone would lose the reconstruction
    (8 divisions by 256 exceed the float64 mantissa), so that setting is refused; exact
    streams (the default) store the dropped bits and the generated backward equals autograd
    exactly, for one uint8 per element per scaled update."""
    model = tiny_model("mixtral", num_hidden_layers=4)
    ids = _ids(2, 16)
    kw = dict(coupling=coupling, momentum=2**-8)
    with pytest.raises(RevFFNError, match="use exact_streams=True"):
        rf.transform(model, exact_streams=False, stream_dtype="float64", **kw)
    exact_rev = rf.transform(model, **kw)
    assert exact_rev.options.exact_streams
    exact = rf.verify(exact_rev, ids)
    assert exact.ok, exact.summary()
    with exact_rev.plain_autograd():
        _, g_auto = _grads_of(exact_rev, ids)
    _, g_gen = _grads_of(exact_rev, ids)
    assert all(torch.equal(g_gen[k], g_auto[k]) for k in g_auto)  # bit for bit
    one = tiny_model("mixtral", num_hidden_layers=1)  # 2 scaled updates: float64 is enough
    bytes_wide = saved_tensor_bytes(lambda: rf.transform(
        one, exact_streams=False, stream_dtype="float64", **kw).train()(ids, labels=ids).loss)[0]
    bytes_exact = saved_tensor_bytes(lambda: rf.transform(one, **kw).train()(
        ids, labels=ids).loss)[0]
    per_update = ids.numel() * 64  # hidden 64, one byte each
    assert bytes_exact - bytes_wide == 2 * per_update, (bytes_exact, bytes_wide)


def _grads_of(rev: Any, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    from revffn_fx.checks.verification import _grads

    return _grads(rev.train(), ids, {"labels": ids}, 0, False)


def test_exact_streams_need_a_power_of_two() -> None:
    with pytest.raises(RevFFNError, match="2\\*\\*-k"):
        rf.transform(tiny_model("mixtral"), coupling="momentum", momentum=0.3)




# g != 1/2: there g and 1 - g are equal, so an inverse that swapped them would pass
UNEVEN = [0.25, 0.125]


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
@pytest.mark.parametrize("g", UNEVEN)
def test_update_keeps_g_and_its_inverse_divides_by_g(g: float, exact: bool) -> None:
    """Update.combine keeps g of the overwritten stream (``g * old + out``); Update.invert
    gives ``old`` back: to rounding on float streams, bit for bit on the exact grid."""
    from revffn_fx.runtime.grid import FLOAT64_GRID
    from revffn_fx.runtime.layers import Update

    EXACT_GRID_BITS = FLOAT64_GRID.bits  # noqa: N806

    torch.manual_seed(0)
    u = Update(torch.nn.Linear(16, 16, dtype=torch.float64), target=1, reads=[0],
               ctx_names=[], scale=g)
    xs = [torch.randn(3, 16, dtype=torch.float64) for _ in range(2)]
    s = 2.0 ** EXACT_GRID_BITS
    if exact:
        u.grid = EXACT_GRID_BITS
        xs = [torch.round(x * s) / s for x in xs]
    lost: list[torch.Tensor] = []
    with torch.no_grad():
        out = u.run(xs, {})
        new = u.combine(xs, out, lost)
        torch.testing.assert_close(new, g * xs[1] + out, rtol=0, atol=2 / s if exact else 0)
        assert len(lost) == (1 if exact else 0)
        back = u.invert(new, u.run([xs[0], new], {}), lost.pop() if u.keeps_bits else None)
    if exact:
        assert torch.equal(back, xs[1])
    else:
        torch.testing.assert_close(back, xs[1], rtol=1e-14, atol=1e-14)


def _layer_inputs(rev: Any, ids: torch.Tensor) -> list[tuple[Any, list[torch.Tensor], dict]]:
    """Each reversible layer with the streams and context it got in a training forward
    (plain autograd: the layers run as modules; with exact streams the grid is set)."""
    from revffn_fx.runtime.stack import RevStack

    graph = rev.graph(training=True, has_mask=False, has_labels=True)
    layers = [la for m in graph.modules() if isinstance(m, RevStack) for la in m.layers]
    seen: list[tuple[Any, list[torch.Tensor], dict]] = []
    handles = [la.register_forward_hook(
        lambda m, args, _out: seen.append((m, [s.detach() for s in args[0]], args[1])))
        for la in layers]
    try:
        with rev.plain_autograd():
            rev.train()(ids, labels=ids)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(layers) == 2
    return seen


@pytest.mark.parametrize("exact", [False, True], ids=["float", "exact"])
@pytest.mark.parametrize("g", UNEVEN)
@pytest.mark.parametrize("coupling", SCALED)
def test_runtime_inverse_with_g_not_one_half(coupling: str, g: float, exact: bool) -> None:
    """The runtime's inverse (verification's round_trip and the generated backward, both
    through Update.invert) at g = 1/4 and 1/8, on float64 streams and on exact streams."""
    from revffn_fx.checks.verification import round_trip

    rev = rf.transform(tiny_model("qwen2_moe", dtype=torch.float64), coupling=coupling,
                       momentum=g, exact_streams=exact)
    assert rev.momentum == g and rev.options.exact_streams == exact
    ids = _ids()
    for layer, xs, ctx in _layer_inputs(rev, ids):
        assert all(u.grid is not None for u in layer.updates) == exact
        with torch.no_grad():
            err = round_trip(layer, xs, ctx, rev.options.fixed_point_iters,
                             rev.options.fixed_point_tol)
        assert (err == 0.0) if exact else (err <= 1e-13), (layer.name, err)
    with rev.plain_autograd():
        _, g_auto = _grads_of(rev, ids)
    with count_backwards() as calls:
        _, g_gen = _grads_of(rev, ids)
    assert calls, "the generated backward never ran"
    for k in g_auto:
        if exact:  # the backward reconstructs each layer's input on the grid exactly
            assert torch.equal(g_gen[k], g_auto[k]), k
        else:
            torch.testing.assert_close(g_gen[k], g_auto[k], rtol=1e-10, atol=1e-12, msg=k)
