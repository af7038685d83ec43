"""Cross-branch attention (issue 9): queries from X1, keys/values from X2, X1 by fixed point."""

from __future__ import annotations

import types
import warnings
from typing import Any

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.checks.verification import _grads, _rel
from revffn_fx.passes.cross_attention import CrossAttention

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe", "phimoe",
         "deepseek_v3"]
TOL = 1e-13
# qwen3_moe's qk-norm makes its layer 0 a slow contraction (~0.95 per step) at random init
ITERS = 400


def fp64_norms(model: torch.nn.Module) -> torch.nn.Module:
    """HF RMSNorms compute in fp32 even for fp64 inputs, which caps how exactly a fixed
    point can be reconstructed (~1e-8); compute them in the input dtype so the test
    measures the method, not that rounding (both sides of each check use the same model)."""
    for mod in model.modules():
        if type(mod).__name__.endswith("RMSNorm") and hasattr(mod, "weight"):
            eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))

            def forward(self: Any, h: torch.Tensor, _eps: float = eps) -> torch.Tensor:
                return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + _eps))

            mod.forward = types.MethodType(forward, mod)
    return model


def _ids(batch: int = 2, seq: int = 6) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _cross(name: str, **kw: Any) -> rf.RevModel:
    model = fp64_norms(tiny_model(name, dtype=torch.float64))
    return rf.transform(model, attention="cross", fixed_point_iters=ITERS,
                        fixed_point_tol=TOL, **kw)


@pytest.mark.parametrize("name", ARCHS)
def test_cross_gradients_match_autograd(name: str, record_property: Any) -> None:
    """Default options: the fixed point iterates to the dtype's tolerance (fp64: 1e-11), so
    fp64 gradients through it equal plain autograd to 1e-10; a layer whose fixed point is
    too slow for the default iterations (qwen3_moe's and olmoe's layer 0 at random init)
    falls back to the plain coupling at transform time and is exact."""
    model = fp64_norms(tiny_model(name, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rev = rf.transform(model, attention="cross")
    assert rev.options.fixed_point_tol == 1e-11 and rev.options.fixed_point_iters == 200
    rev.train()
    specs = rev.specs(True)
    crossed = [i for i, s in rev.cross_status.items() if s == "cross"]
    assert crossed and set(crossed) | set(rev.cross_fallbacks) == {0, 1}, rev.cross_status
    for i, spec in specs.items():  # F reads x1 now: a fixed point; G stays closed form
        if i in crossed:
            assert [u.closed_form for u in spec.updates] == [False, True]
            assert spec.updates[0].reads == [0, 1]
        else:
            assert [u.closed_form for u in spec.updates] == [True, True]
            assert "did not converge" in rev.cross_status[i]
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    kw = {"labels": ids, "attention_mask": mask}
    rev.options.fixed_point_stats.clear()
    _, g_rev = _grads(rev, ids, kw, 0, True)  # the embedding output's gradient among them
    stats = dict(rev.options.fixed_point_stats)
    with rev.plain_autograd():
        _, g_ref = _grads(rev, ids, kw, 0, True)
    assert set(g_rev) == set(g_ref)
    worst = max((_rel(g_rev[k], g_ref[k]), k) for k in g_ref)
    assert worst[0] <= 1e-10, worst
    # one fixed point per crossed layer, converged to the tolerance; the counts are reported
    assert len(stats) == len(crossed)
    assert all(1 <= n <= 200 and r <= 1e-11 for n, r in stats.values())
    record_property("fixed_point_iterations", {k: n for k, (n, _) in stats.items()})
    print(f"{name}: fixed point iterations {stats}, max grad rel err {worst[0]:.1e}")


def test_verify_reports_fixed_point_and_reconstruction() -> None:
    rev = _cross("mixtral")
    report = rf.verify(rev, _ids(), output_router_logits=True)
    assert report.ok and report.max_grad_rel_err <= 1e-8, report.summary()
    assert sorted(report.fixed_point) == ["model.layers.0.0", "model.layers.1.0"]
    assert all(c.reconstruction_err <= 1e-10 for c in report.layers), report.layers
    assert "fixed point" in report.summary()


def test_coupling_graph_is_tagged_and_split() -> None:
    rev = _cross("deepseek_v3")  # MLA: q_a/q_b on the query side, kv_a/kv_b on the other
    gm = rev.specs(True)[1].forward
    tags = [n.meta.get("revffn") for n in gm.graph.nodes]
    assert tags.count("cross_attention") == 1
    # the query path: F_up on x1, then its own copy of the input norm
    query = [n for n in gm.graph.nodes if n.meta.get("revffn") == "cross_query"]
    assert [n.target for n in query] == ["adapters.F_up", "input_layernorm"]
    assert query[0].args[0].args[1] == 0  # the X1 stream
    cross = rev._cross[1]
    assert isinstance(cross, CrossAttention)
    graph = next(iter(cross._cache.values())).graph
    sides = {n.target: n.meta.get("cross_side") for n in graph.graph.nodes
             if n.op == "call_function" and "linear" in str(n.target)}
    assert sides  # every projection is on one side; query-side ones read only the query
    linears = [n for n in graph.graph.nodes if "linear" in str(n.target)]
    q_side = [n for n in linears if n.meta.get("cross_side") == "q"]
    kv_side = [n for n in linears if n.meta.get("cross_side") == "kv"]
    assert len(q_side) == 2 and len(kv_side) == 2  # q_a, q_b | kv_a, kv_b


def test_cross_attention_is_the_original_when_both_inputs_agree() -> None:
    model = tiny_model("dbrx", dtype=torch.float64)  # fused Wqkv: the output is split
    attn = model.transformer.blocks[0].norm_attn_norm.attn
    x = torch.randn(1, 5, 64, dtype=torch.float64)
    pos = torch.arange(5)[None]
    cos_sin = model.transformer.rotary_emb(x, pos)
    kw = dict(position_ids=pos, position_embeddings=cos_sin, attention_mask=None)
    cross = CrossAttention(attn, "hidden_states")
    cross.check((), dict(kw, hidden_states=x))
    y = torch.randn_like(x)
    # queries follow the query input: token-wise changes to it change only its own rows
    ref = cross(x, hidden_states=y, **kw)[0]
    q2 = x.clone()
    q2[:, 2] += 1.0
    got = cross(q2, hidden_states=y, **kw)[0]
    changed = (got - ref).abs().amax(dim=-1)[0] > 0
    assert changed.tolist() == [False, False, True, False, False]


def test_unsplittable_attention_falls_back_per_layer() -> None:
    # jetmoe's attention routes its queries through experts (.item() on the data): a
    # traced graph would be valid for one input only, so the layers keep the closed form
    rev = rf.transform(tiny_model("jetmoe", dtype=torch.float64), attention="cross")
    specs = rev.specs(True)
    assert all(s.startswith("closed form: data-dependent") for s in rev.cross_status.values())
    assert all(u.closed_form for s in specs.values() for u in s.updates)


def test_non_contractive_branch_falls_back_and_trains() -> None:
    """A model whose fixed point diverges (scaled attention projections in layer 0) converts
    with that layer falling back to the plain coupling, says so, and trains."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.o_proj):
            proj.weight.mul_(30.0)
    with pytest.warns(UserWarning, match=r"layer 0 .*falls back to the plain coupling"):
        rev = rf.transform(model, attention="cross")
    assert list(rev.cross_fallbacks) == [0]
    assert rev.cross_status[0].startswith("closed form: the fixed point did not converge")
    assert rev.cross_status[1] == "cross"
    report = rev.report()
    assert "layer 0: plain coupling, cross-branch attention off: the fixed point" in report
    assert "layer 1: cross-branch attention" in report
    specs = rev.specs(True)
    assert [u.closed_form for u in specs[0].updates] == [True, True]
    assert [u.closed_form for u in specs[1].updates] == [False, True]
    rev.train()
    opt = torch.optim.SGD(rev.parameters(), lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = rev(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert list(rev.options.fixed_point_stats) == ["model.layers.1.0"]


def test_later_non_converging_batch_names_the_layer() -> None:
    """A batch that the fixed point does not converge on (here: too few iterations allowed)
    stops the backward with the layer and what to change, never a silent wrong step."""
    rev = _cross("mixtral")
    rev.train()
    rev.options.fixed_point_iters = 1
    ids = _ids()
    loss = rev(ids, labels=ids).loss
    with pytest.raises(rf.FixedPointError,
                       match=r"layer model\.layers\.\d .*residual .*attention='plain'"):
        loss.backward()


def test_fp32_default_tolerance() -> None:
    assert rf.transform(tiny_model("mixtral"), attention="cross").options.fixed_point_tol == 1e-6


def test_options_are_checked() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(rf.RevFFNError, match="revffn"):
        rf.transform(model, coupling="revnet", attention="cross")
    with pytest.raises(rf.RevFFNError, match="unknown attention"):
        rf.transform(model, attention="sideways")
