"""What rf.verify catches beyond "the generated backward equals the coupled model's autograd":
fidelity to the original layers, real mismatches, and parameters shared between updates."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.fx as fx
from zoo import HandMoE, tiny_model

import revffn_fx as rf
from revffn_fx.runtime import function as rev_function


def _ids(seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name,coupling,attention", [
    ("mixtral", "revffn", "plain"), ("granitemoe", "revnet", "plain"),
    ("flex_olmo", "revffn", "plain"), ("dbrx", "revnet", "plain"),
    ("qwen2_moe", "revffn", "cross"), ("hand", "revffn", "plain"),
])
def test_recomposed_branches_reproduce_the_original_layers(name: str, coupling: str,
                                                          attention: str) -> None:
    rev = rf.transform(tiny_model(name, dtype=torch.float64), coupling=coupling,
                       attention=attention)
    report = rf.verify(rev, _ids())
    # (cross-branch gradients are checked in test_cross_branch.py)
    assert report.ok or attention == "cross", report.summary()
    fids = [c.fidelity_err for c in report.layers]
    assert len(fids) == 2 and all(f is not None and f <= 1e-12 for f in fids), fids


def _drop(target_part: str) -> Any:
    """A (buggy) pass that drops the first call of a module whose name contains
    ``target_part`` from a coupling graph, passing its input through."""

    def drop(gm: fx.GraphModule) -> fx.GraphModule:
        node = next(n for n in gm.graph.nodes
                    if n.op == "call_module" and target_part in str(n.target))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        return gm

    return drop


@pytest.mark.parametrize("name,part", [("mixtral", "post_attention_layernorm"),
                                       ("hand", "moe_norm")])
def test_a_rewrite_that_drops_a_computation_fails_verify(name: str, part: str) -> None:
    """The coupled model is consistent with itself (its gradients check out), but it no
    longer contains the original layer: only the fidelity check can see that."""
    rev = rf.transform(tiny_model(name, dtype=torch.float64), passes=[_drop(part)])
    report = rf.verify(rev, _ids())
    assert report.max_grad_rel_err <= 1e-10  # self-consistent ...
    assert not report.ok, report.summary()  # ... but not the original model
    assert all(c.fidelity_err is not None and c.fidelity_err > 1e-3 for c in report.layers)
    assert "fidelity" in report.summary()


def test_verify_fails_on_a_real_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """RNG replay switched off in the runtime: the report itself says FAILED."""
    rev = rf.transform(tiny_model("dbrx", dtype=torch.float64, resid_pdrop=0.1,
                                  emb_pdrop=0.1))
    assert rf.verify(rev, _ids(12)).ok

    @contextmanager
    def no_replay(state: Any) -> Any:
        yield

    monkeypatch.setattr(rev_function.rng, "replay", no_replay)
    report = rf.verify(rev, _ids(12))
    assert not report.ok and report.max_grad_rel_err > 1e-6, report.summary()
    assert report.summary().startswith("FAILED")


@pytest.mark.parametrize("coupling", ["revffn", "revnet"])
def test_parameters_shared_between_updates_accumulate(coupling: str) -> None:
    """A layer module used twice (tied layers) gets the sum of both uses' gradients: the
    same as two untied copies whose gradients are added."""
    torch.manual_seed(0)
    tied = HandMoE(layers=3).double()
    tied.blocks[2] = tied.blocks[0]
    untied = copy.deepcopy(tied)
    untied.blocks[2] = copy.deepcopy(untied.blocks[0])
    ids = _ids()
    grads = []
    for model in (tied, untied):
        rev = rf.transform(model, coupling=coupling).train()
        assert rf.verify(rev, ids).ok
        rev.zero_grad(set_to_none=True)
        loss = rev(ids, labels=ids).loss
        loss.backward()
        grads.append((float(loss.detach()), {n: p.grad for n, p in rev.named_parameters()}))
    (loss_t, g_t), (loss_u, g_u) = grads
    assert loss_t == pytest.approx(loss_u, rel=1e-12)
    for name, g in g_t.items():
        if name.startswith("model.blocks.0."):
            want = g_u[name] + g_u[name.replace("blocks.0.", "blocks.2.")]
        elif name.startswith("adapters.0."):
            want = g_u[name] + g_u[name.replace("adapters.0.", "adapters.2.")]
        else:
            want = g_u[name]
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12, msg=name)


def test_exact_streams_verify_with_a_small_g(monkeypatch: pytest.MonkeyPatch) -> None:
    """exact_streams at g = 1/256: the reconstruction is checked with the stored bits (0.0),
    and without them the same check fails."""
    from revffn_fx.runtime.layers import Update

    rev = rf.transform(tiny_model("mixtral"), coupling="momentum", momentum=2.0 ** -8,
                       exact_streams=True)  # float64 streams picked for the grid
    report = rf.verify(rev, _ids())
    assert report.ok and max(c.reconstruction_err for c in report.layers) == 0.0, \
        report.summary()
    real = Update.invert
    monkeypatch.setattr(Update, "invert", lambda self, new, out, lost=None, streams=None: real(
        self, new, out, None if lost is None else torch.zeros_like(lost), streams))
    report = rf.verify(rev, _ids())
    assert max(c.reconstruction_err for c in report.layers) > 1e-6
