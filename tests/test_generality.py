"""Hand-written MoE LMs (issue 16): their own calling conventions and residual forms.

Each model is traced with logits, loss and every parameter gradient equal to the
original's, converted with both couplings, and the generated backward checked against
plain autograd in fp64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from zoo import PARALLEL_HF, tiny_model, tiny_parallel_hf

import revffn_fx as rf
from revffn_fx.errors import RevFFNError, TraceError
from revffn_fx.frontend.outputs import logits_and_loss

HAND = ["gpt", "tokens", "parallel", "three", "skip"]


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _call(model: Any, name: str, ids: torch.Tensor) -> Any:
    return model(ids, labels=ids) if name != "tokens" else model(ids)


def _loss(out: Any) -> torch.Tensor:
    logits, loss = logits_and_loss(out)
    return loss if loss is not None else logits.pow(2).mean()


@pytest.mark.parametrize("name", HAND)
def test_traced_equals_original(name: str) -> None:
    model = tiny_model(name)
    traced = rf.trace(model)
    ids = _ids()
    ref = _call(model, name, ids)
    ref_loss = _loss(ref)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out = _call(traced, name, ids)
    assert type(out) is type(ref)  # the model's own return structure
    torch.testing.assert_close(logits_and_loss(out)[0], logits_and_loss(ref)[0],
                               atol=1e-6, rtol=0)
    loss = _loss(out)
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-6
    loss.backward()
    assert set(ref_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("coupling", ["revffn", "revnet"])
@pytest.mark.parametrize("name", HAND)
def test_converted_fp64_backward_matches_autograd(name: str, coupling: str) -> None:
    model = tiny_model(name, dtype=torch.float64)
    rev = rf.transform(model, coupling=coupling)
    assert rev.converted == [0, 1]
    n_updates = 3 if name in ("three", "skip") else 2
    assert all(len(rev.specs(True)[i].updates) == n_updates for i in (0, 1))
    ids = _ids()
    out = _call(rev, name, ids)
    assert type(out) is type(_call(model, name, ids))
    report = rf.verify(rev, ids)
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()
    assert report.embedding_grad_rel_err <= 1e-10


def test_own_argument_names_and_errors() -> None:
    model = tiny_model("tokens")
    rev = rf.transform(model)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(rev(tokens=ids), rev(ids))
    with pytest.raises(RevFFNError, match="takes no labels"):
        rev(ids, labels=ids)
    out = rev.generate(ids[:, :4], max_new_tokens=3)  # greedy decoding reads its logits
    assert out.shape == (2, 7) and torch.equal(out[:, :4], ids[:, :4])
    gpt = rf.transform(tiny_model("gpt"))
    logits, loss = gpt(ids, ids)  # positional labels, as GPTMoE.forward(input_ids, labels)
    assert logits is None or logits.shape == (2, 8, 128)
    assert loss.dim() == 0


def test_untraceable_signature_says_what_was_tried() -> None:
    class Needs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model("gpt")

        def forward(self, input_ids: torch.Tensor, temperature: float) -> Any:
            return self.inner(input_ids)[0] / temperature

    with pytest.raises(TraceError, match="required parameter.*temperature"):
        rf.trace(Needs())

    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tiny_model("gpt")

        def forward(self, input_ids: torch.Tensor, labels: Any = None) -> Any:
            return self.inner(input_ids, labels)["logits"]  # a tuple has no keys

    with pytest.raises(TraceError) as err:
        rf.trace(Keyed())
    msg = str(err.value)
    assert "tried Keyed.forward(input_ids=..., labels=...)" in msg and "TypeError" in msg
    assert "control flow" not in msg


# ------------------------------------------------------------------------------- copies


def _step(rev: Any, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one training step through the generated backward."""
    rev.train()
    rev.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = rev(ids, labels=ids, return_logits=True)
    logits, loss = logits_and_loss(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}
    rev.zero_grad(set_to_none=True)
    return logits.detach(), grads


def _same(a: tuple[torch.Tensor, dict[str, torch.Tensor]],
          b: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    assert a[1].keys() == b[1].keys() and len(a[1]) > 0
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name", ["mixtral", "gpt"])
def test_copies_give_the_same_outputs_and_gradients(name: str, tmp_path: Any) -> None:
    import copy

    ids = _ids()
    rev = rf.transform(tiny_model(name))
    with torch.no_grad():  # make the adapters differ from their init, so copying matters
        for p in rev.adapters.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = copy.deepcopy(rev)  # never run: its graphs are traced on first use
    ref = _step(rev, ids)
    _same(_step(before, ids), ref)
    after = copy.deepcopy(rev)  # compiled graphs are copied too, onto the copied weights
    _same(_step(after, ids), ref)
    with torch.no_grad():
        next(after.model.parameters()).add_(1.0)  # the copy owns its weights
    _same(_step(rev, ids), ref)

    fresh = rf.transform(tiny_model(name, seed=7))
    fresh.load_state_dict(rev.state_dict())
    _same(_step(fresh, ids), ref)
    torch.save(rev.state_dict(), tmp_path / "rev.pt")
    loaded = rf.transform(tiny_model(name, seed=8))
    loaded.load_state_dict(torch.load(tmp_path / "rev.pt"))
    _same(_step(loaded, ids), ref)


def test_trl_reference_model() -> None:
    utils = pytest.importorskip("trl.experimental.utils")
    rev = rf.transform(tiny_model("mixtral"))
    ids = _ids()
    ref_model = utils.create_reference_model(rev)  # a deepcopy, frozen, in eval mode
    assert not any(p.requires_grad for p in ref_model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(ref_model(ids).logits, rev.eval()(ids).logits,
                                   rtol=0, atol=0)
    rev.train()
    _, grads = _step(rev, ids)  # the policy still trains through its own stacks
    assert any("adapters" in n for n in grads)


# ------------------------------------------------------------------ residual forms


def test_pairing_alternates_across_layers() -> None:
    """Three updates per layer: X1, X2, X1 in layer 0, then X2, X1, X2 in layer 1; the
    revffn down-adapters start out keeping the half each update writes; inspect says so."""
    rev = rf.transform(tiny_model("three"))
    assert rev.update_targets == {0: [0, 1, 0], 1: [1, 0, 1]}
    for i, targets in rev.update_targets.items():
        spec = rev.specs(True)[i]
        assert [u.target for u in spec.updates] == targets
        assert [u.reads for u in spec.updates] == [[1 - t] for t in targets]
        half = rev.hidden_size // 2
        for name, t in zip("FGH", targets):
            down = rev.adapters[str(i)][f"{name}_down"].weight
            kept = down[:, :half] if t == 0 else down[:, half:]
            assert torch.equal(kept, torch.eye(half)), (i, name)
    assert "moe -> X1 (reads X2)" in rev.plan.layers[0].pairing
    assert "the next layer starts on X2" in rev.plan.layers[0].pairing
    assert rev.plan.layers[1].pairing.startswith("attention -> X2 (reads X1)")
    assert "layer 1: attention -> X2 (reads X1), attention -> X1" in rev.report()
    plan = rf.analyze(rf.trace(tiny_model("three")))  # what `revffn inspect` shows
    assert [lp.pairing for lp in plan.layers] == [lp.pairing for lp in rev.plan.layers]
    assert "pairing" in plan.to_dict()["layers"][0]


def test_parallel_residual_is_sequenced_and_says_so() -> None:
    model = tiny_model("parallel")
    plan = rf.analyze(rf.trace(model))
    lp = plan.layers[0]
    assert lp.convertible and lp.kinds == ["attention", "moe"]
    assert lp.sublayers[0].residual_node == lp.sublayers[1].residual_node == "x"
    assert "parallel residual (attention and moe read the same input)" in lp.pairing
    assert "the function changes slightly" in lp.pairing
    rev = rf.transform(model)
    # the shared norm is copied into each branch, reading that branch's own stream
    gm = rev.specs(True)[0].forward
    norms = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "norm"]
    assert len(norms) == 2 and norms[0].args[0] is not norms[1].args[0]


class _TwoPoints(torch.nn.Module):
    """The MoE reads the stream before and after the attention: not a sequence of updates."""

    def __init__(self, *args: Any) -> None:
        super().__init__()
        from zoo import HandBlock

        self.inner = HandBlock(*args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = self.inner
        h = x + b.attn(b.attn_norm(x), mask)
        return h + b.moe(b.moe_norm(h) + x)


def test_not_a_sequence_of_updates_is_refused_with_a_reason() -> None:
    model = tiny_model("gpt")
    model.h = torch.nn.ModuleList(_TwoPoints(64, 4, 96, 4, 2) for _ in range(2))
    plan = rf.analyze(rf.trace(model))
    assert not plan.layers[0].convertible
    assert "reads the residual stream at two points" in plan.layers[0].reason
    with pytest.raises(rf.ConversionError, match="two points"):
        rf.transform(model)


@pytest.mark.parametrize("name", sorted(PARALLEL_HF))
def test_hf_parallel_residual_architectures_convert(name: str) -> None:
    """GPT-NeoX, Cohere, GPT-J: attention and MLP read the same input; both couplings
    convert them and the generated backward equals autograd in fp64."""
    model = tiny_parallel_hf(name, dtype=torch.float64)
    plan = rf.analyze(rf.trace(model))
    assert all(lp.convertible and "parallel residual" in lp.pairing for lp in plan.layers)
    ids = _ids()
    coupling = "revnet" if name == "gptj" else "revffn"  # both, across the three
    report = rf.verify(rf.transform(model, coupling=coupling), ids)
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()


def test_object_and_dict_outputs_keep_their_structure() -> None:
    import dataclasses

    from zoo import GPTMoE

    @dataclasses.dataclass
    class Out:
        logits: torch.Tensor
        loss: torch.Tensor | None = None
        note: str = "mine"

    class DataclassLM(GPTMoE):
        def forward(self, input_ids: torch.Tensor, labels: Any = None) -> Out:
            logits, loss = super().forward(input_ids, labels)
            return Out(logits, loss)

    class DictLM(GPTMoE):
        def forward(self, input_ids: torch.Tensor, targets: Any = None) -> dict[str, Any]:
            logits, loss = super().forward(input_ids, targets)
            return {"logits": logits, "loss": loss}

    ids = _ids()
    for cls in (DataclassLM, DictLM):
        torch.manual_seed(0)
        model = cls()
        rev = rf.transform(model)
        with torch.no_grad():
            ref = model(ids, ids)
            got = rev.eval()(ids, ids)
        assert type(got) is type(ref)
        ref_logits, ref_loss = logits_and_loss(ref)
        logits, loss = logits_and_loss(got)
        assert logits.shape == ref_logits.shape and loss.dim() == 0
        if cls is DataclassLM:
            assert got.note == "mine"
        rev.train()
        out = rev(ids, targets=ids) if cls is DictLM else rev(ids, labels=ids)
        logits_and_loss(out)[1].backward()  # the model's own loss, through the stacks
        assert rev.adapters["0"]["F_up"].weight.grad is not None


def test_shortcut_that_skips_a_sublayer_converts() -> None:
    """``h = x + attn(n1(x)); out = h + mlp(n2(h)) + moe(n3(x))``: the MoE reads the layer
    input, skipping two updates; coupled as the third update in sequence."""
    lp = rf.analyze(rf.trace(tiny_model("skip"))).layers[0]
    assert lp.convertible and lp.kinds == ["attention", "mlp", "moe"]
    assert [s.residual_node for s in lp.sublayers] == ["x", "add", "x"]
    assert "a shortcut (moe reads the stream from before the attention and mlp updates)" \
        in lp.pairing
