"""The analysis pass: residual sublayers, their kinds and forms, convertibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ARCHS, HandMoE, tiny_config, tiny_model

import revffn_fx as rf
from revffn_fx.frontend import registry
from revffn_fx.frontend.registry import ArchFacts

PRE = ("attention", "pre_norm"), ("moe", "pre_norm")
EXPECTED = {
    "mixtral": [PRE, PRE],
    "qwen2_moe": [PRE, PRE],
    "qwen3_moe": [PRE, PRE],
    "olmoe": [PRE, PRE],
    "gpt_oss": [PRE, PRE],
    "phimoe": [PRE, PRE],
    "dbrx": [PRE, PRE],  # residuals inside the nested norm_attn_norm module
    "jetmoe": [PRE, PRE],  # its mixture-of-attention-experts is still "attention"
    "hand": [PRE, PRE],
    "deepseek_v3": [(("attention", "pre_norm"), ("mlp", "pre_norm")), PRE],  # dense layer 0
    "granitemoe": [(("attention", "scaled"), ("moe", "scaled"))] * 2,
    "flex_olmo": [(("attention", "post_norm"), ("moe", "post_norm"))] * 2,
    "minimax": [(("attention", "norm_residual"), ("moe", "norm_residual"))] * 2,
}


@pytest.fixture(scope="module")
def plans() -> dict[str, rf.Plan]:
    return {name: rf.analyze(rf.trace(tiny_model(name))) for name in EXPECTED}


def test_every_architecture_is_covered() -> None:
    assert set(ARCHS) | {"hand"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_kinds_and_forms(plans: dict[str, rf.Plan], name: str) -> None:
    plan = plans[name]
    got = [tuple((s.kind, s.residual_form) for s in lp.sublayers) for lp in plan.layers]
    assert got == [tuple(e) for e in EXPECTED[name]]
    if name == "minimax":
        assert not any(lp.convertible for lp in plan.layers)
        assert all("not of the form x + f(x)" in lp.reason for lp in plan.layers)
    else:
        assert all(lp.convertible and lp.reason == "" for lp in plan.layers)


def test_granitemoe_scale_is_residual_multiplier(plans: dict[str, rf.Plan]) -> None:
    mult = tiny_config("granitemoe").residual_multiplier
    scales = {s.scale for lp in plans["granitemoe"].layers for s in lp.sublayers}
    assert scales == {mult}


def test_norms_and_modules_are_recorded(plans: dict[str, rf.Plan]) -> None:
    attn, moe = plans["mixtral"].layers[0].sublayers
    assert attn.norm_before == "input_layernorm" and attn.norm_after is None
    assert attn.modules == ["input_layernorm", "self_attn"]
    assert moe.modules == ["post_attention_layernorm", "mlp"]
    assert moe.module_kinds == {"post_attention_layernorm": "norm", "mlp": "moe"}
    post = plans["flex_olmo"].layers[0].sublayers[0]
    assert post.norm_before is None and post.norm_after == "post_attention_layernorm"


def test_summary_and_json(plans: dict[str, rf.Plan]) -> None:
    plan = plans["deepseek_v3"]
    assert plan.summary() == "2 layers: 2 convertible; attention 2, moe 1, mlp 1"
    d = plan.to_dict()
    assert d["model"]["model_type"] == "deepseek_v3" and len(d["layers"]) == 2
    assert d["model"]["hidden_size"] == 64 and d["model"]["parameters"] > 0


class _NoResidualBlock(nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x))


def test_layer_without_residual_is_not_convertible() -> None:
    model = HandMoE(hidden=32, layers=2, heads=2)
    model.blocks = nn.ModuleList(_NoResidualBlock() for _ in range(2))
    plan = rf.analyze(rf.trace(model))
    assert [lp.convertible for lp in plan.layers] == [False, False]
    assert plan.layers[0].reason.startswith("no residual connection")
    with pytest.raises(rf.ConversionError, match="no convertible decoder layer"):
        rf.transform(model)


class _ConcatExperts(nn.Module):
    """Experts stored as one concatenated 2-D weight, with no recorded router: structure
    alone reads this as a dense MLP, which is what the override registry is for."""

    def __init__(self, hidden: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w = nn.Parameter(torch.randn(experts * hidden, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w[: x.shape[-1]].T


def test_kind_override_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    model = HandMoE(hidden=32, layers=1, heads=2)
    model.blocks[0].moe = _ConcatExperts()
    model.config = type("Cfg", (), {"model_type": "concat_moe", "hidden_size": 32})()
    assert rf.analyze(rf.trace(model)).layers[0].kinds == ["attention", "mlp"]
    monkeypatch.setitem(registry.REGISTRY, "concat_moe", ArchFacts(kind_overrides={"moe": "moe"}))
    assert rf.analyze(rf.trace(model)).layers[0].kinds == ["attention", "moe"]


def test_registry_entries_are_real_architectures() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for name, facts in registry.REGISTRY.items():
        assert name in CONFIG_MAPPING, name
        assert facts.kind_overrides or facts.load_kwargs, name
