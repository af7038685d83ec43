"""The exact mode (coupling "none") and the whole-step headline benchmark (bench --step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx import cli
from revffn_fx.runtime.stack import Checkpointed
from revffn_fx.training import fuse_optimizer

ROOT = Path(__file__).resolve().parents[1]
EXACT_ARCHS = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"]


def _ids(vocab: int = 128, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (2, seq), generator=torch.Generator().manual_seed(5))


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# -- exact mode -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXACT_ARCHS)
def test_exact_mode_is_the_same_function(name: str) -> None:
    model = tiny_model(name)
    rev = rf.transform(model, coupling="none")
    ids = _ids()
    model.eval()
    rev.eval()
    with torch.no_grad():  # eval: logits bit for bit, with and without gradients
        assert torch.equal(rev(ids).logits, model(ids).logits)
    assert torch.equal(rev(ids).logits, model(ids).logits)
    model.train()
    rev.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in rev.parameters()} == {id(p) for p in params}  # nothing added
    torch.manual_seed(0)  # routers with jitter draw the same noise in both
    ref = model(ids, labels=ids, use_cache=False).loss
    g_ref = _grads(ref, params)
    torch.manual_seed(0)
    out = rev(ids, labels=ids)
    assert out.logits is None  # the lean head ran
    assert rev.loss_head_status == "chunked"
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(out.loss, params), g_ref):
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_exact_mode_checkpoints_every_layer_and_keeps_less() -> None:
    from revffn_fx.memory import saved_tensor_bytes

    model = tiny_model("mixtral", num_hidden_layers=4)
    rev = rf.transform(model, coupling="none").train()
    gm = rev.graph(True, False, True, chunked_head=True)
    assert sum(isinstance(m, Checkpointed) for m in gm.modules()) == 4
    assert rev.converted == [] and rev.is_gradient_checkpointing
    ids = _ids(seq=64)
    plain = saved_tensor_bytes(lambda: model(ids, labels=ids, use_cache=False).loss)[0]
    exact = saved_tensor_bytes(lambda: rev(ids, labels=ids).loss)[0]
    assert exact < plain / 4, (exact, plain)
    rev.activation_checkpointing_disable()  # the ablation: lean head only
    gm = rev.graph(True, False, True, chunked_head=True)
    assert not any(isinstance(m, Checkpointed) for m in gm.modules())


@pytest.mark.parametrize("optim", [torch.optim.SGD, torch.optim.AdamW])
def test_exact_mode_with_the_fused_optimizer_steps_like_the_optimizer(optim: type) -> None:
    # SGD is linear in the gradient: the steps agree to rounding. AdamW divides by the
    # gradient's root mean square, which turns rounding in a near-zero gradient into a
    # visible difference of that one element: compared loosely (a few % of lr)
    kw, tol = (dict(lr=0.1, momentum=0.9), 1e-6) if optim is torch.optim.SGD \
        else (dict(lr=1e-3), 2e-4)
    ids = _ids()
    finals = []
    for fused in (False, True):
        model = tiny_model("qwen2_moe")
        if fused:
            rev = rf.transform(model, coupling="none").train()
            opt = fuse_optimizer(rev, optim, **kw)
            for _ in range(2):
                rev(ids, labels=ids).loss.backward()
                opt.step()
            assert all(p.grad is None for p in rev.parameters())  # freed as they arrived
            opt.remove()
        else:
            model.train()
            opt = optim(model.parameters(), **kw)
            for _ in range(2):
                model(ids, labels=ids, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    start = list(tiny_model("qwen2_moe").parameters())
    assert all(not torch.equal(a, s) for a, s in zip(finals[1], start))  # every one stepped


def test_exact_mode_saves_loads_and_converts_from_the_command_line(tmp_path: Path) -> None:
    model = tiny_model("mixtral").eval()
    rev = rf.transform(model, coupling="none")
    rev.save_pretrained(tmp_path / "api")
    back = rf.load(tmp_path / "api")
    assert back.coupling == "none" and back.converted == [] and back.checkpoint_rest
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    res = CliRunner().invoke(cli.transform_main, [str(ROOT / "examples" / "tiny-mixtral"),
                                                  str(tmp_path / "cli"), "--coupling", "none"])
    assert res.exit_code == 0, res.output
    assert "exact mode" in res.output
    assert rf.load(tmp_path / "cli").coupling == "none"


def test_exact_mode_refuses_a_layer_selection() -> None:
    with pytest.raises(rf.RevFFNError, match="exact mode"):
        rf.transform(tiny_model("mixtral"), coupling="none", layers="0")
