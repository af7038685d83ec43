"""PEFT (LoRA) on a RevModel: get_peft_model, the exact generated backward with LoRA, the
coupling's adapters when the base is frozen, rf.verify with frozen weights, merging."""

from __future__ import annotations

import warnings

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.errors import RevFFNError
from revffn_fx.peft_support import train_coupling_adapters

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "o_proj", "lm_head"]


def _ids(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (2, 8), generator=g)


def _lora(rev: torch.nn.Module) -> torch.nn.Module:
    pm = peft.get_peft_model(rev, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                  task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init: give LoRA an effect, so its gradients are tested
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("coupling", ["revffn", "revnet", "momentum", "none"])
def test_get_peft_model_trains_lora_with_the_exact_backward(coupling: str) -> None:
    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling=coupling).train()
    ids = _ids()
    rev(ids, labels=ids).loss.backward()  # compiled before PEFT: compiled again after it
    rev.zero_grad(set_to_none=True)
    pm = _lora(rev)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # adapters frozen with LoRA
    assert any("lm_head.lora_A" in n for n in trainable)
    pm(input_ids=ids, labels=ids).loss.backward()
    got = _grads(pm)
    assert set(got) == set(trainable)
    pm.zero_grad(set_to_none=True)
    with rev.plain_autograd():
        pm(input_ids=ids, labels=ids).loss.backward()
    want = _grads(pm)
    err = max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)
    assert err <= 1e-10
    report = rf.verify(rev, ids)  # the base frozen: verify checks what trains
    assert report.ok, report.summary()


def test_coupling_adapters_follow_an_explicit_option() -> None:
    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling="revffn").train()
    pm = _lora(rev)
    assert not any(p.requires_grad for p in rev.adapters.parameters())
    names = train_coupling_adapters(pm)
    assert names and all(p.requires_grad for p in rev.adapters.parameters())
    ids = _ids()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in rev.adapters.parameters())
    train_coupling_adapters(pm, False)
    assert not any(p.requires_grad for p in rev.adapters.parameters())


def test_lora_added_before_the_transform_freezes_the_adapters() -> None:
    model = tiny_model("mixtral", dtype=torch.float64)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    task_type="CAUSAL_LM"))
    with pytest.raises(RevFFNError, match="base_model.model"):
        rf.transform(pm)
    with pytest.warns(UserWarning, match="adapters are frozen too"):
        rev = rf.transform(pm.base_model.model, coupling="revffn").train()
    trainable = [n for n, p in rev.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with warnings.catch_warnings():  # an ordinary model keeps trainable adapters, silently
        warnings.simplefilter("error")
        plain = rf.transform(tiny_model("mixtral"), coupling="revffn")
    assert all(p.requires_grad for p in plain.adapters.parameters())


def test_merge_and_unload_gives_the_same_function() -> None:
    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling="revffn").eval()
    pm = _lora(rev)
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
        merged = pm.merge_and_unload()
        assert merged is rev
        got = rev(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not any("lora" in n for n, _ in rev.named_parameters())
    out = pm.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)


def test_merge_and_unload_then_to_original_is_a_standard_checkpoint(tmp_path) -> None:
    """For the exact mode (and bdia): LoRA merged into the weights, then the original
    Hugging Face class, saved and loaded by transformers alone."""
    from transformers import AutoModelForCausalLM

    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling="none").eval()
    if not hasattr(rev, "to_original"):
        pytest.skip("rev.to_original() does not exist yet")
    pm = _lora(rev)
    ids = _ids()
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    pm.merge_and_unload()
    original = rev.to_original()
    original.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64,
                                                  experts_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-10, atol=1e-12)
