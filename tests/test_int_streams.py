"""Exact streams in 4 bytes: int32 units of 2**-16 (runtime/grid.py), the default grid of
16-bit models and ``stream_dtype="int32"`` for any. The same integers as the float64
arithmetic; what the generated backward stores; the retry on float64 when a stream leaves
the int32 range; the options and the memory plan that follow.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.checks.exactness import exactness
from revffn_fx.errors import ConversionError
from revffn_fx.runtime import grid as grids
from revffn_fx.runtime.grid import INT32_GRID, choose_grid, round_to_grid, to_units
from revffn_fx.runtime.layers import Update
from revffn_fx.runtime.sampled import SampledUpdate
from revffn_fx.tools.estimate_memory import stream_layout


def _ids(b: int = 2, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))


def test_choose_grid() -> None:
    assert choose_grid(None, torch.bfloat16) is INT32_GRID
    assert choose_grid(None, torch.float16) is INT32_GRID
    assert choose_grid(None, torch.float32).int_units is False
    assert choose_grid(torch.int32, torch.float32) is INT32_GRID
    assert choose_grid(torch.float64, torch.bfloat16).int_units is False
    assert INT32_GRID.limit == 2.0 ** 14 and INT32_GRID.stored_bytes() == 4


def _updates(g: float) -> list[Update]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    bdia = SampledUpdate(lin, target=1, reads=[0], ctx_names=[], magnitude=g)
    bdia.sampling = True
    return [Update(lin, target=1, reads=[0], ctx_names=[], scale=1.0),
            Update(lin, target=1, reads=[0], ctx_names=[], scale=g), bdia]


@pytest.mark.parametrize("g", [0.5, 0.125, 0.0625])
def test_int_units_are_the_float64_integers(g: float) -> None:
    """combine on int32 units gives the units of combine on float64 values (negative
    streams included: ``>>`` and ``&`` are the floor and the non-negative remainder), and
    invert gives the old units back bit for bit."""
    s = 2.0 ** INT32_GRID.bits
    for u in _updates(g):
        u.grid, u.view_dtype = INT32_GRID.bits, INT32_GRID.view_dtype
        torch.manual_seed(1)
        xs = round_to_grid([torch.randn(4, 8, 16) * 50 for _ in range(2)], INT32_GRID)
        values = [x.double() for x in xs]
        units = [to_units(x, INT32_GRID.bits) for x in xs]
        with torch.no_grad():
            u.prepare(values)
            drawn = u.gamma if isinstance(u, SampledUpdate) else None
            out = u.run(values, {})
            assert torch.equal(out, u.run(units, {}))  # branches read the same float32
            lost_f: list[torch.Tensor] = []
            lost_i: list[torch.Tensor] = []
            new_f = u.combine(values, out, lost_f)
            new_i = u.combine(units, out, lost_i)
            assert new_i.dtype == torch.int32
            assert torch.equal(new_f * s, new_i.double()), type(u).__name__
            assert all(torch.equal(a, b) for a, b in zip(lost_f, lost_i))
            if drawn is not None:
                u.restore(drawn)
            back = u.invert(new_i, out, lost_i.pop() if u.keeps_bits else None, units)
        assert torch.equal(back, units[1]), type(u).__name__


def _saved_dtypes(rev: Any, ids: torch.Tensor) -> dict[torch.dtype, int]:
    """Bytes saved for backward in a training step, by dtype, over the stacks' streams."""
    seen: dict[torch.dtype, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 3 and t.shape[:2] == ids.shape:  # a hidden state: (batch, seq, d)
            seen[t.dtype] = seen.get(t.dtype, 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = rev(ids, labels=ids).loss
    loss.backward()
    return seen


@pytest.mark.parametrize("coupling", ["momentum", "bdia"])
def test_16_bit_models_keep_int32_streams(coupling: str) -> None:
    """bf16 by default: the stacks keep int32 units (4 bytes), no float64 hidden state;
    fp32 by default keeps float64, and takes int32 when asked."""
    ids = _ids()
    bf16 = rf.transform(tiny_model("mixtral", dtype=torch.bfloat16, num_hidden_layers=2),
                        coupling=coupling).train()
    saved = _saved_dtypes(bf16, ids)
    assert saved.get(torch.int32, 0) > 0 and torch.float64 not in saved, saved
    fp32 = rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling=coupling).train()
    saved = _saved_dtypes(fp32, ids)
    assert saved.get(torch.float64, 0) > 0 and torch.int32 not in saved, saved
    asked = rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling=coupling,
                         stream_dtype="int32").train()
    saved = _saved_dtypes(asked, ids)
    assert saved.get(torch.int32, 0) > 0 and torch.float64 not in saved, saved


@pytest.mark.parametrize("coupling", ["momentum", "bdia", "revnet"])
def test_int32_streams_meet_the_criterion_in_fp32(coupling: str) -> None:
    """int32 streams over fp32 weights (asked for): exact reconstruction, so the generated
    backward's error is autograd's (the grid's coarser rounding is the function's)."""
    model = tiny_model("mixtral", num_hidden_layers=4)
    rev = rf.transform(model, coupling=coupling, stream_dtype="int32").train()
    assert rev.options.exact_streams
    r = exactness(rev, _ids())
    assert r.ok, r
    assert r.gen <= 1.01 * r.auto + 1e-7, r


def _big_streams(coupling: str) -> Any:
    model = tiny_model("mixtral", dtype=torch.bfloat16, num_hidden_layers=3)
    with torch.no_grad():  # residual streams near 1e4-1e5: beyond the int32 grid's 16384
        model.get_input_embeddings().weight.mul_(1e6)
    return rf.transform(model, coupling=coupling).train()


@pytest.mark.parametrize("coupling", ["momentum", "bdia"])
def test_streams_beyond_the_int32_range_retry_in_float64(coupling: str) -> None:
    """The step runs again on float64 values (gradients exact), once: later steps of the
    stack start on float64 (no second warning, float64 saved, no int32)."""
    rev = _big_streams(coupling)
    with pytest.warns(RuntimeWarning, match="beyond the int32 exact streams' range"):
        r = exactness(rev, _ids())
    assert r.ok, r
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        saved = _saved_dtypes(rev, _ids())
    assert saved.get(torch.float64, 0) > 0 and torch.int32 not in saved, saved


def test_without_the_retry_the_gradients_are_wrong(monkeypatch) -> None:  # noqa: ANN001
    """The retry is what keeps such a step exact: without it the int32 units wrap, the
    wrapped step reconstructs itself consistently (the guard cannot see it) but computes
    another function, and its gradients fail the criterion."""
    rev = _big_streams("momentum")  # with the retry: the test above
    monkeypatch.setattr(grids, "out_of_range", lambda flags: False)
    r = exactness(rev, _ids())
    assert not r.ok and r.gen > 0.1, r


def test_int32_option() -> None:
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling="revnet",
                       stream_dtype="int32")
    assert rev.options.exact_streams and rev.options.stream_dtype == torch.int32
    with pytest.raises(ConversionError, match="needs exact_streams"):
        rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling="momentum",
                     stream_dtype="int32", exact_streams=False)


def test_the_plan_counts_4_byte_exact_streams() -> None:
    from zoo import tiny_config

    config = tiny_config("mixtral")
    assert stream_layout(config, "momentum", "bfloat16") == (4, 3)
    assert stream_layout(config, "momentum", "float32") == (8, 3)
    assert stream_layout(config, "momentum", "float32", stream_dtype="int32") == (4, 3)
    assert stream_layout(config, "bdia", "bfloat16")[0] == 4
    assert stream_layout(config, "momentum", "bfloat16", stream_dtype="float64")[0] == 8


def test_bf16_autocast_over_fp32_weights_takes_the_int32_grid() -> None:
    """The Trainer's bf16=True: fp32 weights, branches in bf16 under autocast; the stacks
    keep int32 units, and the generated backward's gradients are plain autograd's. (The
    backward here runs outside autocast: the guard's fingerprint must not follow autocast,
    which took the forward's projection to bf16 and raised a false ReconstructionError.)"""
    from revffn_fx.checks.exactness import flat_grads, relative_error

    ids = _ids()
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=3), coupling="momentum").train()

    def step() -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rev(ids, labels=ids).loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = _saved_dtypes(rev, ids)
    assert saved.get(torch.int32, 0) > 0 and torch.float64 not in saved, saved
    torch.manual_seed(0)
    gen, _ = flat_grads(rev, step)
    with rev.plain_autograd():
        torch.manual_seed(0)
        auto, _ = flat_grads(rev, step)
    assert gen.keys() == auto.keys() and relative_error(gen, auto) < 1e-5


def test_int32_streams_survive_export_and_load(tmp_path) -> None:  # noqa: ANN001
    """``revffn-transform --stream-dtype int32``: recorded, and the loaded model trains on
    the int32 grid."""
    from pathlib import Path

    from revffn_fx.export import transform_dir

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"
    transform_dir(example, tmp_path / "out", coupling="momentum", stream_dtype="int32")
    back = rf.load(tmp_path / "out").train()
    assert back.options.stream_dtype == torch.int32 and back.options.exact_streams
    saved = _saved_dtypes(back, _ids())
    assert saved.get(torch.int32, 0) > 0 and torch.float64 not in saved, saved
