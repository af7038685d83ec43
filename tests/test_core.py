"""The core: reversible couplings with a generated backward, checked against autograd."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from zoo import RANDOM, tiny_model

import revffn_fx as rf
from revffn_fx.runtime import function as rev_function
from revffn_fx.runtime import rng
from revffn_fx.tools.measure_memory import saved_tensor_bytes

CORE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe",
        "phimoe", "dbrx", "jetmoe", "hand"]
COUPLINGS = ["revffn", "revnet"]


@contextmanager
def count_backwards() -> Any:
    """Count calls of the generated backward, to be sure a check exercised it."""
    calls: list[int] = []
    orig = rev_function.RevFunction.backward

    def counted(*args: Any) -> Any:
        calls.append(1)
        return orig(*args)

    rev_function.RevFunction.backward = staticmethod(counted)  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        rev_function.RevFunction.backward = staticmethod(orig)  # type: ignore[method-assign]


def _ids(batch: int = 2, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("name", CORE)
def test_fp64_gradients_match_autograd(name: str, coupling: str) -> None:
    model = tiny_model(name, dtype=torch.float64)
    rev = rf.transform(model, coupling=coupling)
    assert rev.converted == [0, 1]
    assert_backward_exact(rev)


def assert_backward_exact(rev: rf.RevModel) -> None:
    """fp64: the generated backward ran and equals plain autograd (<= 1e-10) on a batch
    with a left-padded row, and every layer's inverse undoes it (<= 1e-12)."""
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    with count_backwards() as calls:
        report = rf.verify(rev, ids, attention_mask=mask, output_router_logits=True)
    assert calls, "the generated backward never ran"
    assert report.ok, report.summary()
    assert report.max_grad_rel_err <= 1e-10, report.summary()
    assert report.embedding_grad_rel_err <= 1e-10
    assert len(report.layers) == len(rev.converted)
    assert all(c.reconstruction_err <= 1e-12 for c in report.layers), report.layers


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "dbrx", "hand"])
def test_fp32_gradients_match_autograd(name: str) -> None:
    rev = rf.transform(tiny_model(name), coupling="revffn")
    report = rf.verify(rev, _ids(), output_router_logits=True)
    assert report.ok and report.max_grad_rel_err <= 1e-4, report.summary()


@pytest.mark.parametrize("name", ["phimoe", "dbrx", "mixtral"])
def test_randomness_is_replayed(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """phimoe samples routes, dbrx has dropout, mixtral router jitter (zoo turns those on):
    replayed, the gradients match; without replay the same check must fail."""
    model = tiny_model(name, dtype=torch.float64, **RANDOM[name])
    rev = rf.transform(model, coupling="revffn")
    ids = _ids(seq=12)
    assert rf.verify(rev, ids, output_router_logits=True).max_grad_rel_err <= 1e-10

    @contextmanager
    def no_replay(state: Any) -> Any:
        yield

    monkeypatch.setattr(rev_function.rng, "replay", no_replay)
    assert rf.verify(rev, ids, output_router_logits=True).max_grad_rel_err > 1e-6


def test_rng_replay_restores_draws() -> None:
    state = rng.capture([])
    first = torch.rand(4)
    with rng.replay(state):
        again = torch.rand(4)
    after = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, after)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_router_logits_and_aux_loss(coupling: str) -> None:
    model = tiny_model("mixtral", dtype=torch.float64)
    rev = rf.transform(model, coupling=coupling).train()
    ids = _ids()
    out = rev(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2  # one per MoE layer, in order
    lbl = sys.modules[type(model).__module__].load_balancing_loss_func
    expected = lbl(out.router_logits, model.num_experts, model.num_experts_per_tok, None)
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    plain = rev(ids, labels=ids)
    torch.testing.assert_close(out.loss, plain.loss + model.router_aux_loss_coef * out.aux_loss)
    # the aux loss alone trains the routers through the generated backward
    routers = [p for n, p in rev.named_parameters() if n.endswith("mlp.gate.weight")]
    assert len(routers) == 2
    g_rev = torch.autograd.grad(rev(ids, output_router_logits=True).aux_loss, routers)
    with rev.plain_autograd():
        g_ref = torch.autograd.grad(rev(ids, output_router_logits=True).aux_loss, routers)
    for a, b in zip(g_rev, g_ref):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_inverse_of_forward_is_identity(coupling: str) -> None:
    rev = rf.transform(tiny_model("qwen2_moe", dtype=torch.float64), coupling=coupling).eval()
    spec = rev.specs()[1]
    layer = spec.layer("l1")
    torch.manual_seed(0)
    x = [torch.randn(2, 8, 32 if coupling == "revffn" else 64, dtype=torch.float64)
         for _ in range(2)]
    t = rev.traced.layers[1]
    ctx = _layer_context(rev, x[0].shape[1])
    from revffn_fx.checks.verification import round_trip

    with torch.no_grad():  # the runtime's own inverse: the one the backward runs
        err = round_trip(layer, x, {k: ctx[k] for k in t.call.inputs}, 50, 1e-11)
    assert err <= 1e-12


def _layer_context(rev: rf.RevModel, seq: int) -> dict[str, Any]:
    """Capture the context (mask, positions) the model passes to its layers."""
    captured: dict[str, Any] = {}
    layer = rev.traced.layers[0].module

    def hook(_m: Any, args: Any, kwargs: Any) -> None:
        captured.update(kwargs)

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            rev.model(_ids(seq=seq))
    finally:
        h.remove()
    return captured


def test_eval_and_no_grad_run_plain_modules() -> None:
    rev = rf.transform(tiny_model("olmoe"))
    ids = _ids()
    with count_backwards() as calls:
        rev.eval()(ids, labels=ids).loss.backward()
        assert not calls  # eval mode: plain modules, ordinary autograd
        rev.train()
        with torch.no_grad():
            nog = rev(ids, labels=ids)
        assert nog.loss.grad_fn is None
        rev(ids, labels=ids).loss.backward()
        assert calls  # train mode with grad: the generated backward
    with rev.plain_autograd():
        ref = rev(ids, labels=ids)
    torch.testing.assert_close(nog.loss, ref.loss)


def test_layer_selection_and_checkpointed_rest() -> None:
    model = tiny_model("mixtral", dtype=torch.float64, num_hidden_layers=4)
    rev = rf.transform(model, layers="1-2", checkpoint_rest=True)
    assert rev.converted == [1, 2]
    code = rev.graph(True).code
    assert code.count("revffn_stack_") >= 1 and "revffn_ckpt_" in code
    assert len(rev.stacks(True)) == 1 and len(rev.stacks(True)[0].layers) == 2
    report = rf.verify(rev, _ids(), output_router_logits=True)
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()
    with pytest.raises(rf.RevFFNError, match="out of range"):
        rf.transform(model, layers="7")
    with pytest.raises(rf.RevFFNError, match="bad layer spec"):
        rf.transform(model, layers="a-b")


def test_unknown_coupling_is_refused() -> None:
    with pytest.raises(rf.RevFFNError, match="unknown coupling"):
        rf.transform(tiny_model("mixtral"), coupling="nope")


def _mixtral_like(layers: int) -> torch.nn.Module:
    return tiny_model("mixtral", num_hidden_layers=layers, hidden_size=64,
                      intermediate_size=128)


def test_saved_memory_is_flat_in_depth_and_below_checkpointing() -> None:
    ids = _ids(batch=2, seq=64)
    figures = {}
    for depth in (4, 16):
        model = _mixtral_like(depth).train()
        rev = rf.transform(model)
        figures[("rev", depth)] = saved_tensor_bytes(lambda m=rev: m(ids, labels=ids).loss)[0]
        model.activation_checkpointing_enable({"use_reentrant": False})
        figures[("ckpt", depth)] = saved_tensor_bytes(
            lambda m=model: m(ids, labels=ids).loss)[0]
    assert figures[("rev", 16)] <= 1.10 * figures[("rev", 4)], figures
    assert figures[("rev", 16)] < figures[("ckpt", 16)], figures
    assert figures[("rev", 4)] < figures[("ckpt", 4)], figures
    # checkpointing grows with depth (one boundary per layer); the reversible stack not
    assert figures[("ckpt", 16)] > 1.5 * figures[("ckpt", 4)], figures


def test_bf16_autocast_step_runs_and_verifies() -> None:
    rev = rf.transform(tiny_model("mixtral"))
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rev.train()(ids, labels=ids)
        out.loss.backward()
        grads = [p.grad for p in rev.parameters() if p.grad is not None]
        assert len(grads) == len(list(rev.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        report = rf.verify(rev, ids)
    assert report.dtype == "bfloat16"
    assert report.max_grad_rel_err < 5e-2, report.summary()


@pytest.mark.parametrize("name,kw", [
    # dense layers, no experts
    ("llama", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=96)),
    # sandwich norms, a scaled (subclassed) embedding, logit soft-capping in the head
    ("gemma2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, head_dim=16)),
])
def test_architectures_no_issue_names(name: str, kw: dict) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[name](vocab_size=128, num_hidden_layers=2, max_position_embeddings=64,
                               tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    rev = rf.transform(AutoModelForCausalLM.from_config(cfg, dtype=torch.float64))
    assert rev.converted == [0, 1]
    report = rf.verify(rev, _ids())
    assert report.ok and report.max_grad_rel_err <= 1e-10, report.summary()
    assert rev.loss_head_status == "chunked"


def test_greedy_generate_matches_argmax_of_the_model() -> None:
    rev = rf.transform(tiny_model("mixtral")).train()
    ids = _ids(batch=2, seq=5)
    out = rev.generate(ids, max_new_tokens=4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids) and rev.training
    with torch.no_grad():
        step = ids
        for _ in range(4):
            step = torch.cat([step, rev.eval()(step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
    eos = int(out[0, 5])
    # transformers' generate pads finished rows with pad_token_id
    stopped = rev.generate(ids, max_new_tokens=4, eos_token_id=eos, pad_token_id=eos)
    assert (stopped[0, 5:] == eos).all()


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "granitemoe", "hand"])
def test_backbone_is_the_forward_without_the_head(name: str) -> None:
    """rev.backbone (what trainers with their own fused head call as ``base_model``):
    lm_head of its hidden states gives the forward's logits, its router logits are the
    forward's, and its gradients through the reversible stacks equal plain autograd."""
    model = tiny_model(name, dtype=torch.float64)
    rev = rf.transform(model, coupling="revffn").train()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    torch.manual_seed(0)
    out = rev(ids, attention_mask=mask, output_router_logits=True, return_logits=True)
    torch.manual_seed(0)
    back = rev.base_model(input_ids=ids, attention_mask=mask, output_router_logits=True,
                          use_cache=False)
    head = rev.get_output_embeddings()
    if name == "granitemoe":  # granite divides the logits by logits_scaling after the head
        scaled = head(back.last_hidden_state) / model.config.logits_scaling
        torch.testing.assert_close(scaled, out.logits, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(head(back.last_hidden_state), out.logits, rtol=1e-12,
                                   atol=1e-12)
    if out.router_logits:
        assert len(back.router_logits) == len(out.router_logits)
        for a, b in zip(back.router_logits, out.router_logits):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    def grads(plain: bool) -> dict[str, torch.Tensor]:
        rev.zero_grad()
        with rev.plain_autograd(plain):
            torch.manual_seed(0)
            h = rev.backbone(ids, attention_mask=mask).last_hidden_state
            (h.sin() * mask[..., None]).sum().backward()
        return {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}

    ref, got = grads(True), grads(False)
    assert ref.keys() == got.keys() and any("adapters" in n for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    with pytest.raises(rf.RevFFNError, match="unsupported"):
        rev.backbone(ids, labels=ids)
