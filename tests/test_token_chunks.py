"""Token-chunked MoE/MLP calls (runtime/chunking.py, passes/chunk_tokens.py): the same
function and gradients as the whole call, for every coupling and architecture; the
backward's recompute never holds more than a chunk of a token-wise module; a module that
mixes tokens is called whole; router logits come back one tensor per call."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import ARCHS, tiny_model

import revffn_fx as rf
from revffn_fx.checks.exactness import exactness, flat_grads, relative_error
from revffn_fx.runtime.chunking import TokenChunked
from revffn_fx.runtime.layers import RuntimeOptions

CHUNK = 32
COUPLINGS = ["revffn", "revnet", "momentum", "meft", "bdia"]


def _ids(b: int = 2, s: int = 48, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def _wrappers(rev: rf.RevModel) -> list[TokenChunked]:
    return [m for spec in rev.specs().values() for u in spec.updates
            for m in u.branch.modules() if isinstance(m, TokenChunked)]


def _loss(rev: rf.RevModel, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # bdia draws its gamma: the same draws in both runs
    out = rev(ids, labels=ids, output_router_logits=True)
    return out.loss + out.aux_loss


@pytest.mark.parametrize("coupling", COUPLINGS)
def test_chunked_is_the_whole_call(coupling: str) -> None:
    """Chunks of 32 tokens of 96 against the whole call: the same loss and gradients up to
    rounding, and the generated backward as exact as autograd (checks/exactness.py)."""
    model = tiny_model("mixtral", num_hidden_layers=3, router_jitter_noise=0.0)
    rev = rf.transform(model, coupling=coupling).train()
    ids = _ids()
    got = {}
    for chunk in (0, CHUNK):
        rev.options.token_chunk = chunk
        got[chunk] = flat_grads(rev, lambda: _loss(rev, ids))[0]
    assert relative_error(got[CHUNK], got[0]) < 1e-5
    wrappers = _wrappers(rev)
    assert wrappers and all(w.tokenwise for w in wrappers)
    e = exactness(rev, ids, call=lambda m: _loss(m, ids))
    assert e.ok, str(e)


@pytest.mark.parametrize("coupling", ["revnet", "bdia", "momentum"])
def test_chunked_in_bf16_at_depth(coupling: str) -> None:
    """bf16 weights, 12 layers: the chunked recompute meets the exactness criterion."""
    model = tiny_model("mixtral", dtype=torch.bfloat16, num_hidden_layers=12,
                       router_jitter_noise=0.0)
    rev = rf.transform(model, coupling=coupling).train()
    rev.options.token_chunk = CHUNK
    e = exactness(rev, _ids(), call=lambda m: _loss(m, _ids()))
    assert e.ok, str(e)
    assert all(w.tokenwise for w in _wrappers(rev))


def test_the_backward_never_runs_the_moe_on_more_than_a_chunk() -> None:
    model = tiny_model("mixtral", num_hidden_layers=2, router_jitter_noise=0.0)
    seen: list[int] = []
    for layer in model.model.layers:
        # a pre-hook: the checkpoint's recompute stops as soon as it has what the backward
        # needs, before the module's forward hooks would run
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2]
                                                                     * a[0].shape[0]))
    rev = rf.transform(model, coupling="revnet").train()
    ids = _ids()
    rev.options.token_chunk = 0
    _loss(rev, ids).backward()
    assert max(seen) == ids.numel()  # the whole call, without chunks
    seen.clear()
    rev.options.token_chunk = CHUNK
    _loss(rev, ids).backward()
    assert seen and max(seen) <= CHUNK
    # forward, recompute, and the checkpointed chunks again inside the vector-Jacobian
    # product: three passes of three chunks per layer, after the probe's three calls
    assert len(seen) == 2 * (3 + 3 * 3)


def test_router_logits_are_one_tensor_per_layer() -> None:
    model = tiny_model("mixtral", num_hidden_layers=2, router_jitter_noise=0.0)
    rev = rf.transform(model, coupling="revffn").train()
    ids = _ids()
    outs = {}
    for chunk in (0, CHUNK):
        rev.options.token_chunk = chunk
        outs[chunk] = rev(ids, labels=ids, output_router_logits=True)
    whole, chunked = outs[0].router_logits, outs[CHUNK].router_logits
    assert len(chunked) == len(whole) == 2
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].aux_loss, outs[CHUNK].aux_loss)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "minimax"])  # not convertible
def test_every_architecture_chunks_its_moe(arch: str) -> None:
    """The MoE blocks of every tracked architecture pass the probe and give the whole
    call's gradients in chunks (a module drawing noise per call is called whole)."""
    model = tiny_model(arch, num_hidden_layers=2)
    rev = rf.transform(model, coupling="revnet").train()
    ids = _ids(s=40)
    got = {}
    for chunk in (0, CHUNK):
        rev.options.token_chunk = chunk
        torch.manual_seed(0)
        got[chunk] = flat_grads(rev, lambda: rev(ids, labels=ids).loss)[0]
    wrappers = _wrappers(rev)
    assert wrappers, "no token-wise module wrapped"
    noisy = arch in ("mixtral", "phimoe", "dbrx")  # jitter or dropout in train mode
    if not noisy:
        assert all(w.tokenwise for w in wrappers), [w.why for w in wrappers]
        assert relative_error(got[CHUNK], got[0]) < 1e-5
    else:
        assert all(w.tokenwise is not None for w in wrappers)


class _MixesTokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + x.mean(dim=-2, keepdim=True)


def test_a_module_that_mixes_tokens_is_called_whole() -> None:
    mod = _MixesTokens()
    wrapper = TokenChunked(mod, RuntimeOptions(token_chunk=4))
    x = torch.randn(2, 10, 8)
    state = torch.get_rng_state()
    torch.testing.assert_close(wrapper(x), mod(x))
    assert wrapper.tokenwise is False and "depends on the other tokens" in wrapper.why
    assert torch.equal(torch.get_rng_state(), state)  # the probe left the RNG alone


def test_a_tokenwise_module_is_chunked_with_its_gradients() -> None:
    mod = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double()
    wrapper = TokenChunked(mod, RuntimeOptions(token_chunk=4))
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
    out = wrapper(x)
    assert wrapper.tokenwise is True
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mod.parameters()], g)
    ref = torch.autograd.grad(mod(x), [x, *mod.parameters()], g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_option_is_checked_recorded_and_replayed(tmp_path) -> None:  # noqa: ANN001
    model = tiny_model("mixtral", num_hidden_layers=2, router_jitter_noise=0.0)
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(rf.ConversionError, match="token_chunk"):
            rf.transform(model, coupling="revnet", token_chunk=bad)
    rev = rf.transform(model, coupling="revnet", token_chunk=16)
    assert rev.options.token_chunk == 16
    rev.save_pretrained(tmp_path / "rev")
    assert rf.load(tmp_path / "rev").options.token_chunk == 16


def test_the_cli_option(tmp_path) -> None:  # noqa: ANN001
    from click.testing import CliRunner

    from revffn_fx import cli

    res = CliRunner().invoke(cli.main, ["transform", "examples/tiny-mixtral",
                                        str(tmp_path / "o"), "--token-chunk", "-5"])
    assert res.exit_code == 2 and "--token-chunk" in res.output
    res = CliRunner().invoke(cli.main, ["transform", "--help"])
    assert "--token-chunk" in res.output


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_the_exact_mode_chunks_its_checkpointed_layers(arch: str) -> None:
    """coupling="none" (every layer checkpointed whole): the MoE runs in chunks, inside
    the recompute too; same gradients and router logits as the whole call; the stand-in
    forward is gone after the call (the module is the user's again)."""
    model = tiny_model(arch, num_hidden_layers=2, router_jitter_noise=0.0) \
        if arch == "mixtral" else tiny_model(arch, num_hidden_layers=2)
    seen: list[int] = []
    for layer in model.model.layers:  # the router sees the tokens each MoE call routes
        router = getattr(layer.mlp, "gate", None) or layer.mlp.router
        router.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[:-1].numel()))
    rev = rf.transform(model, coupling="none").train()
    ids = _ids(s=40)
    got, logits = {}, {}
    for chunk in (0, CHUNK):
        rev.options.token_chunk = chunk
        seen.clear()
        got[chunk] = flat_grads(rev, lambda: _loss(rev, ids))[0]
        big = max(seen)
        if chunk == 0:
            assert big == ids.numel()  # the whole call
        logits[chunk] = rev(ids, labels=ids, output_router_logits=True).router_logits
    assert big <= CHUNK  # the last run: chunked, the recompute included
    assert relative_error(got[CHUNK], got[0]) < 1e-5
    assert len(logits[CHUNK]) == len(logits[0])
    for a, b in zip(logits[0], logits[CHUNK]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
