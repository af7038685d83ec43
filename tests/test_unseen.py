"""Issue 27: models the project had not seen convert exactly with no leaf_modules given
(fp64, generated backward against plain autograd <= 1e-10), except those whose residual is
not x + f(x), refused with the form named; forward keywords (position_ids) pass through.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from zoo import (
    REFUSED_FORMS,
    UNSEEN,
    UNSEEN_HF,
    UNSEEN_KINDS,
    ZooLM,
    unseen_hf,
    unseen_model,
)

import revffn_fx as rf
from revffn_fx.errors import ConversionError, RevFFNError
from revffn_fx.frontend.decoder_layers import find_decoder_layers
from revffn_fx.frontend.outputs import logits_and_loss

CONVERTS = [n for n in UNSEEN if n not in REFUSED_FORMS and n not in ("handoff", "shared_kv")]


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", CONVERTS)
def test_unseen_model_converts_exactly(name: str) -> None:
    model = unseen_model(name, torch.float64)
    ids = _ids()
    traced = rf.trace(model)
    with torch.no_grad():  # the traced model computes what the model computes
        want, got = model(ids, labels=ids), traced(ids, labels=ids)
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-12, rtol=0)
    plan = rf.analyze(traced)
    assert [lp.kinds for lp in plan.layers] == [UNSEEN_KINDS[name]] * 2, plan
    rev = rf.transform(model)
    assert rev.converted == [0, 1]
    report = rf.verify(rev, ids)
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()
    assert report.embedding_grad_rel_err <= 1e-10


@pytest.mark.parametrize("name", ["untraceable", "context_object"])
def test_untraceable_model_forward_runs_as_written(name: str) -> None:
    model = unseen_model(name)
    traced = rf.trace(model)
    assert traced.layers_only and "zoo.py:" in traced.model_error, traced.model_error
    if name == "context_object":
        assert "LayerContext" in traced.model_error
        return
    rev = rf.transform(model, coupling="revnet").eval()
    with pytest.raises(ValueError, match="negative token id"):  # its own checks still run
        rev(-_ids())
    assert "original" in rev.loss_head_status


def test_automatic_leaf_is_the_module_that_fails() -> None:
    traced = rf.trace(unseen_model("auto_leaf"))
    assert [sorted(lg.auto_leaves) for lg in traced.layers] == [["blocks.0.moe"],
                                                                ["blocks.1.moe"]]
    # a user's leaf_modules overrides: nothing left to find
    traced = rf.trace(unseen_model("auto_leaf"), leaf_modules=["NormedMoE"])
    assert all(not lg.auto_leaves for lg in traced.layers)


@pytest.mark.parametrize("container", ["list", "dict", "seq", "attr"])
def test_layers_found_in_any_container(container: str) -> None:
    model = ZooLM(container=container, attn="shape" if container == "seq" else "hand")
    names = [q for q, _ in find_decoder_layers(model)]
    assert names == {"list": ["blocks.0", "blocks.1"], "dict": ["blocks.layer0", "blocks.layer1"],
                     "seq": ["blocks.0", "blocks.1"], "attr": ["block_0", "block_1"]}[container]


@pytest.mark.parametrize("name", sorted(REFUSED_FORMS))
def test_residual_forms_are_refused_by_name(name: str) -> None:
    model = unseen_model(name)
    plan = rf.analyze(rf.trace(model))
    form = REFUSED_FORMS[name]
    for lp in plan.layers:
        assert not lp.convertible
        assert f"residual form {form} " in lp.reason, lp.reason
    with pytest.raises(ConversionError, match=f"residual form {form} "):
        rf.transform(model)


@pytest.mark.parametrize("name", ["handoff", "shared_kv"])
def test_layers_handing_state_are_refused(name: str) -> None:
    plan = rf.analyze(rf.trace(unseen_model(name)))
    assert not plan.convertible
    assert all("state handed between layers" in lp.reason for lp in plan.layers), plan
    if name == "shared_kv":
        assert "writes into its 'ctx' argument (a LayerContext)" in plan.layers[0].reason


# -- every forward keyword passes through: packed sequences ---------------------------


def _packed() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, each two documents packed (positions restart at 0)."""
    ids = _ids(2, 10)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    return ids, pos


def _grads(rev: Any, ids: torch.Tensor, **kw: Any) -> dict[str, torch.Tensor]:
    rev.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    logits, loss = logits_and_loss(rev(ids, labels=ids, **kw))
    loss.backward()
    return {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}


def _packed_checks(model: torch.nn.Module, coupling: str) -> None:
    ids, pos = _packed()
    # the exact mode computes the original model's function, keywords included
    exact = rf.transform(model, coupling="none").eval()
    with torch.no_grad():
        # (transformers builds the document mask only without a cache)
        hf = {"use_cache": False} if hasattr(model, "config") else {}
        want = logits_and_loss(model(ids, position_ids=pos, **hf))[0]
        got = logits_and_loss(exact(ids, position_ids=pos))[0]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    rev = rf.transform(model, coupling=coupling)
    # a packed document computes what it computes alone (positions and mask restart)
    with torch.no_grad():
        packed = logits_and_loss(rev.eval()(ids, position_ids=pos))[0]
        alone = logits_and_loss(rev(ids[:1, 4:], position_ids=pos[:1, 4:] - 0))[0]
    torch.testing.assert_close(packed[:1, 4:], alone, atol=1e-10, rtol=0)
    # and the generated backward matches plain autograd with the keyword passed through
    rev.train()
    gen = _grads(rev, ids, position_ids=pos)
    with rev.plain_autograd():
        ref = _grads(rev, ids, position_ids=pos)
    assert set(gen) == set(ref)
    for n, g in ref.items():
        err = float((gen[n] - g).norm() / g.norm().clamp_min(1e-30))
        assert err <= 1e-10, (n, err)


@pytest.mark.parametrize("name", ["moduledict", "untraceable"])
def test_packed_sequences_hand_written(name: str) -> None:
    _packed_checks(unseen_model(name, torch.float64), "revffn")


def test_packed_sequences_transformers() -> None:
    from zoo import tiny_model

    _packed_checks(tiny_model("qwen3_moe", dtype=torch.float64), "revnet")


def test_keywords_the_model_does_not_take_are_refused() -> None:
    rev = rf.transform(unseen_model("moduledict"))
    with pytest.raises(RevFFNError, match=r"unsupported argument\(s\) \['token_type_ids'\]"):
        rev(_ids(), token_type_ids=_ids())


# -- transformers architectures the project had not covered ---------------------------

HF_EXPECTED = {
    "qwen3_5_moe_text": ([["attention", "moe"]] * 2, True),
    "deepseek_v32": ([["attention", "mlp"], ["attention", "moe"]], False),
    "bailing_hybrid": ([["attention", "mlp"]] * 2, False),
    "jamba": ([["mixer", "mlp"], ["mixer", "moe"]], False),
}


@pytest.mark.parametrize("name", sorted(HF_EXPECTED))
def test_unseen_transformers_architecture_converts_exactly(name: str) -> None:
    model = unseen_hf(name, torch.float64)
    traced = rf.trace(model)
    kinds, layers_only = HF_EXPECTED[name]
    assert traced.layers_only == layers_only
    plan = rf.analyze(traced)
    assert [lp.kinds for lp in plan.layers] == kinds, plan
    rev = rf.transform(model)
    assert rev.converted == [0, 1]
    report = rf.verify(rev, _ids())
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()


def test_unseen_transformers_refusals() -> None:
    plan = rf.analyze(rf.trace(unseen_hf("glm_moe_dsa")))
    assert not plan.convertible
    assert "hands to the next layer" in plan.layers[0].reason
    forms = {"gemma4_text": "scaled", "ergo": "affine", "doge": "affine",
             "deepseek_v4": "hyper-connection", "qwen4_exp_text": "hyper-connection",
             "inkling2_text": "hyper-connection"}
    for name, form in forms.items():
        plan = rf.analyze(rf.trace(unseen_hf(name)))
        assert not plan.convertible
        assert all(f"residual form {form} " in lp.reason for lp in plan.layers), plan


def test_zoo_lists_are_consistent() -> None:
    assert set(REFUSED_FORMS) <= set(UNSEEN) and set(HF_EXPECTED) <= set(UNSEEN_HF)


class _GuardedResidual(torch.nn.Module):
    """A norm + attention container that does the residual add itself and branches on a
    tensor value: kept whole automatically, it hides the residual."""

    def __init__(self) -> None:
        super().__init__()
        from zoo import HandAttention

        self.norm = torch.nn.LayerNorm(64)
        self.attn = HandAttention(64, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm(x), mask)
        if bool(h.isnan().any()):
            raise FloatingPointError("nan")
        return h


def test_automatic_leaf_on_the_stream_is_named() -> None:
    model = ZooLM()
    for block in model.blocks:
        block.res = _GuardedResidual()
        block.form = "guarded_residual"

    def forward(self: Any, x: torch.Tensor, mask: torch.Tensor, keep: Any = None) -> Any:
        x = self.res(x, mask)
        return x + self.ffn(x, keep)

    for block in model.blocks:
        block.forward = forward.__get__(block)
    plan = rf.analyze(rf.trace(model))
    assert not plan.convertible
    assert "res was kept whole because torch.fx cannot trace it" in plan.layers[0].reason


def test_layers_only_backbone_and_partial_conversion() -> None:
    model = unseen_model("untraceable", torch.float64)
    ids = _ids()
    # the final hidden state, what lm_head reads
    rev = rf.transform(model).eval()
    with torch.no_grad():
        hidden = rev.backbone(ids).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), rev(ids)["logits"])
    # one layer converted, the other checkpointed: still the generated backward, exactly
    rev = rf.transform(model, layers=[1], checkpoint_rest=True)
    assert rev.converted == [1]
    report = rf.verify(rev, ids)
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()


class _WithHeads(ZooLM):
    """A larger container of modules that do not carry the residual stream (wide heads)."""

    def __init__(self) -> None:
        super().__init__(container="dict")
        self.heads = torch.nn.ModuleList(torch.nn.Linear(64, 2048) for _ in range(3))

    def forward(self, input_ids: torch.Tensor, labels: Any = None) -> dict[str, Any]:
        out = super().forward(input_ids, labels=labels)
        aux = sum(h(self.wte(input_ids)).mean() for h in self.heads)
        return {"logits": out["logits"] + 0 * aux, "loss": out["loss"]}


def test_the_layers_are_the_group_that_carries_the_residual_stream() -> None:
    model = _WithHeads()
    # structure alone ranks the larger group first; the example forward rules it out
    assert [q for q, _ in find_decoder_layers(model)] == ["heads.0", "heads.1", "heads.2"]
    traced = rf.trace(model)
    assert [lg.qualname for lg in traced.layers] == ["blocks.layer0", "blocks.layer1"]
    assert rf.analyze(traced).convertible == [0, 1]


def test_layers_only_on_the_meta_device() -> None:
    # revffn-transform plans on a meta model: its forward runs with data-dependent reads
    # taken as zeros, the layers stubbed when they cannot run on meta
    with torch.device("meta"):
        model = ZooLM(style="branchy")
    traced = rf.trace(model)
    assert traced.layers_only and traced.capture is not None
    plan = rf.analyze(traced)
    assert plan.convertible == [0, 1] and [lp.kinds for lp in plan.layers] == [
        ["attention", "moe"]] * 2
