"""rev.generate: Hugging Face's GenerationMixin with a KV cache on the coupling's inference
function (revffn_fx/generation.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.generation import uncached_reason

PROMPT = 5
NEW = 6


def _ids(batch: int = 2, seq: int = PROMPT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, seq), generator=g)


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = _ids()
    mask = torch.ones_like(ids)
    ids[1, :2] = 0  # row 1: a 3-token prompt, left-padded
    mask[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_exact_mode_generates_the_original_models_tokens(name: str) -> None:
    model = tiny_model(name)
    original = copy.deepcopy(model).eval()
    rev = rf.transform(model, coupling="none").train()
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    got = rev.generate(ids, **kw)
    assert rev.training  # the mode is restored
    assert torch.equal(got, original.generate(ids, **kw))


@pytest.mark.parametrize("coupling", ["revffn", "revnet", "momentum", "meft"])
def test_cached_steps_equal_the_uncached_forward(coupling: str) -> None:
    """Each step's logits from the cached generate equal the RevModel's own uncached forward
    on the sequence so far (fp64; transformers computes RMSNorm and softmax in fp32 even in
    an fp64 model, so the original model's own cached and uncached logits differ by ~5e-8)."""
    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling=coupling).eval()
    assert uncached_reason(rev) is None
    ids, mask = _left_padded()
    out = rev.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                       pad_token_id=0, eos_token_id=None, output_logits=True,
                       return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        for t, logits in enumerate(out.logits):
            n = ids.shape[1] + t
            full = rev(seq[:, :n], attention_mask=torch.cat(
                [mask, torch.ones(2, t, dtype=mask.dtype)], dim=1)).logits[:, -1]
            err = float((logits - full).abs().max() / full.abs().max())
            assert err <= 1e-6, (t, err)
    uncached = rev.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, eos_token_id=None, use_cache=False)
    assert torch.equal(seq, uncached)


def test_the_coupled_function_is_not_the_original() -> None:
    """The patch is active: a revffn model (adapters at their default) generates from its
    own function, and the original model's layers are restored afterwards."""
    model = tiny_model("mixtral")
    original = copy.deepcopy(model).eval()
    rev = rf.transform(model, coupling="revffn").eval()
    ids = _ids()
    out = rev.generate(ids, max_new_tokens=1, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(out.logits[0], rev(ids).logits[:, -1], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(out.logits[0], original(ids).logits[:, -1], atol=1e-3)
        torch.testing.assert_close(model(ids).logits, original(ids).logits)  # unpatched
    assert all("forward" not in vars(layer) for layer in model.model.layers)


class _StopAt(StoppingCriteria):
    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kw: object) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length,
                          dtype=torch.bool)


def test_sampling_beams_lengths_and_stopping_criteria() -> None:
    rev = rf.transform(tiny_model("mixtral"), coupling="revffn").eval()
    ids, mask = _left_padded()
    kw = dict(attention_mask=mask, pad_token_id=0)
    torch.manual_seed(1)
    a = rev.generate(ids, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=NEW, **kw)
    torch.manual_seed(1)
    b = rev.generate(ids, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=NEW, **kw)
    assert torch.equal(a, b) and a.shape == (2, PROMPT + NEW)
    beams = rev.generate(ids, num_beams=3, num_return_sequences=2, max_new_tokens=NEW,
                         do_sample=False, **kw)
    assert beams.shape == (4, PROMPT + NEW)
    # min_new_tokens: eos is suppressed until then (the greedy token made the eos)
    first = int(rev.generate(ids, max_new_tokens=1, do_sample=False, **kw)[0, -1])
    early = rev.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=first, **kw)
    assert early.shape[1] < PROMPT + NEW or (early[0, PROMPT] == first)
    late = rev.generate(ids, max_new_tokens=NEW, min_new_tokens=3, do_sample=False,
                        eos_token_id=first, **kw)
    assert (late[:, PROMPT:PROMPT + 3] != first).all()
    stopped = rev.generate(ids, max_new_tokens=NEW, do_sample=False,
                           stopping_criteria=StoppingCriteriaList([_StopAt(PROMPT + 2)]), **kw)
    assert stopped.shape == (2, PROMPT + 2)


def test_cross_attention_generates_without_a_cache() -> None:
    rev = rf.transform(tiny_model("mixtral", dtype=torch.float64), coupling="revffn",
                       attention="cross").eval()
    assert "cross" in uncached_reason(rev)
    ids = _ids()
    out = rev.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
    with torch.no_grad():
        step = ids
        for _ in range(3):
            step = torch.cat([step, rev(step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
