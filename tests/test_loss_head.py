"""The memory-lean loss head: same loss and gradients as the model's own head."""

from __future__ import annotations

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.runtime.loss import chunked_linear_cross_entropy
from revffn_fx.tools.measure_memory import saved_tensor_bytes


def _batch(seq: int = 10, vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = ids.clone()
    labels[1, :3] = -100  # padding is not predicted
    labels[0, 4] = -100  # an ignored label inside a row
    return ids, mask, labels


def _loss_and_grads(rev: rf.RevModel, **kw: torch.Tensor) -> tuple[torch.Tensor, dict]:
    rev.zero_grad(set_to_none=True)
    out = rev(kw.pop("input_ids"), **kw)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in rev.named_parameters() if p.grad is not None}
    rev.zero_grad(set_to_none=True)
    return out, grads


def _compare(name: str, dtype: torch.dtype, chunk: int | None, tol: float, **overrides) -> None:
    model = tiny_model(name, dtype=dtype, **overrides)
    rev = rf.transform(model).train()
    ids, mask, labels = _batch()
    ref, g_ref = _loss_and_grads(rf.transform(model, loss_head="original").train(),
                                 input_ids=ids, attention_mask=mask, labels=labels)
    rev.graph(True, True, True, chunked_head=True)
    assert rev.loss_head_status == "chunked"
    if chunk is not None:
        head = rev.graph(True, True, True, chunked_head=True).get_submodule("revffn_loss_head")
        head.chunk = chunk
    out, g = _loss_and_grads(rev, input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None  # never materialised
    assert out.loss.dtype == ref.loss.dtype
    assert abs(float(out.loss.detach() - ref.loss.detach())) <= tol * abs(float(ref.loss.detach()))
    assert set(g) == set(g_ref)
    for k in g_ref:
        err = float((g[k] - g_ref[k]).norm() / g_ref[k].norm().clamp_min(1e-30))
        assert err <= tol, (k, err)


HEADS = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"]


@pytest.mark.parametrize("name", HEADS)
def test_fp32_chunked_head_matches_original(name: str) -> None:
    _compare(name, torch.float32, chunk=7, tol=1e-5)


@pytest.mark.parametrize("name", HEADS)
def test_fp64_models_agree_to_fp32_rounding(name: str) -> None:
    # transformers computes the loss in fp32 even for fp64 models (logits.float()), and the
    # chunked head keeps that rule, so agreement is bounded by fp32 rounding (the mean's
    # 1/n is applied at a different point); the arithmetic itself is exact in fp64, see
    # test_chunked_function_against_reference
    _compare(name, torch.float64, chunk=3, tol=1e-6)


def test_tied_embeddings() -> None:
    _compare("qwen3_moe", torch.float32, chunk=5, tol=1e-5, tie_word_embeddings=True)


def test_granite_logit_scaling_is_kept() -> None:
    rev = rf.transform(tiny_model("granitemoe"))
    gm = rev.graph(True, True, True, chunked_head=True)
    code = gm.get_submodule("revffn_loss_head").logit_fn.code
    assert "/ 2.0" in code or "truediv" in code, code


def test_logits_when_asked_or_without_grad() -> None:
    rev = rf.transform(tiny_model("mixtral")).train()
    ids, mask, labels = _batch()
    assert rev(ids, labels=labels, return_logits=True).logits is not None
    with torch.no_grad():
        assert rev(ids, labels=labels).logits is not None


def test_num_items_in_batch_normalises_the_sum() -> None:
    model = tiny_model("mixtral")
    ids, mask, labels = _batch()
    n = torch.tensor(37)
    for head in ("chunked", "original"):
        rev = rf.transform(model, loss_head=head).train()
        mean = rev(ids, attention_mask=mask, labels=labels).loss
        summed = rev(ids, attention_mask=mask, labels=labels, num_items_in_batch=n).loss
        valid = int((labels[:, 1:] != -100).sum())
        torch.testing.assert_close(summed * n, mean * valid, rtol=1e-5, atol=1e-5)


def test_hand_model_keeps_its_own_head() -> None:
    rev = rf.transform(tiny_model("hand"))
    ids, _, labels = _batch()
    out = rev.train()(ids, labels=labels)
    assert out.loss is not None
    assert "not per-token" in rev.loss_head_status


def test_chunked_function_against_reference() -> None:
    torch.manual_seed(0)
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(20, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (13,))
    y[2] = -100
    got = chunked_linear_cross_entropy(h, w, b, y, lambda z: z * 0.5, chunk=4)
    ref = torch.nn.functional.cross_entropy((h @ w.T + b) * 0.5, y, reduction="sum")
    g1 = torch.autograd.grad(got * 3, (h, w, b))
    g2 = torch.autograd.grad(ref * 3, (h, w, b))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_head_activation_memory_drops_fourfold() -> None:
    model = tiny_model("mixtral", vocab_size=4096, num_hidden_layers=1).train()
    ids = torch.randint(0, 4096, (2, 256))
    saved = {}
    for head in ("original", "chunked"):
        rev = rf.transform(model, loss_head=head).train()
        saved[head] = saved_tensor_bytes(lambda r=rev: r(ids, labels=ids).loss)[0]
    # the original keeps the fp32 log-softmax (tokens x vocab); the chunked head keeps the
    # gradients it computed in forward: hidden-sized plus one lm_head-weight-sized tensor
    logits_bytes = 2 * 256 * 4096 * 4
    assert saved["original"] >= logits_bytes, saved
    assert saved["chunked"] <= 0.25 * saved["original"], saved


class _Rows(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, _, labels = _batch(seq=12)
        return {"input_ids": ids[i % 2], "labels": labels[i % 2]}


def test_trainer_gradient_accumulation_same_curve(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    curves = {}
    for head in ("original", "chunked"):
        torch.manual_seed(0)
        rev = rf.transform(tiny_model("mixtral"), loss_head=head)
        args = TrainingArguments(output_dir=str(tmp_path / head), max_steps=4,
                                 per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 learning_rate=1e-2, logging_steps=1, save_strategy="no",
                                 report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
        trainer = Trainer(model=rev, args=args, train_dataset=_Rows())
        trainer.train()
        curves[head] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(curves["chunked"]) == 4
    assert curves["chunked"] == pytest.approx(curves["original"], rel=1e-4)


# -- byte-budgeted chunks -------------------------------------------------------------------

def test_chunk_tokens_follow_vocab_and_bytes() -> None:
    from revffn_fx.runtime.loss import bytes_per_logit, head_chunk_tokens

    # Qwen1.5-MoE's head (hidden 2048, vocab 151936), batch 4 x 2048 tokens
    tokens, d = 8192, 2048
    for dtype in (torch.float32, torch.bfloat16):
        e = torch.finfo(dtype).bits // 8
        sizes = {v: head_chunk_tokens(tokens, d, v, dtype, True, min_chunk=1)
                 for v in (32000, 64000, 151936)}
        for v, c in sizes.items():  # one chunk's logits fit in the hidden states' bytes
            assert c * v * bytes_per_logit(dtype, True) <= tokens * d * e
            assert 2 * c * v * bytes_per_logit(dtype, True) > tokens * d * e  # largest power
        assert sizes[64000] * 2 == sizes[32000]  # twice the vocabulary, half the tokens
    # fp32: Liger-Kernel's tokens * hidden / vocab, rounded down to a power of two
    assert head_chunk_tokens(tokens, d, 151936, torch.float32, True, 1) == 64
    assert head_chunk_tokens(tokens, d, 151936, torch.bfloat16, True, 1) == 32
    assert head_chunk_tokens(tokens, 256, 151936, torch.float32, True) == 32  # the floor
    assert head_chunk_tokens(10, 2048, 1000, torch.float32, True) == 10  # never above tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_working_set_is_twice_the_hidden_states(dtype: torch.dtype) -> None:
    from revffn_fx.tools.measure_memory import peak_live_bytes

    tokens, d, vocab = 1024, 64, 4096
    torch.manual_seed(0)
    h = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, d) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,))

    def step() -> torch.Tensor:
        loss = chunked_linear_cross_entropy(h, w, None, y, min_chunk=1)
        loss.backward()
        return loss

    peak = peak_live_bytes(step)[0]
    e = h.element_size()
    # beyond the weight gradient (a parameter's gradient, there in any method): the hidden
    # states' gradient and one chunk's logits, each at most the hidden states' bytes
    assert peak - vocab * d * e <= 2 * tokens * d * e + 4096, peak
    # the old fixed 1024-token chunk held every logit here: eight times that
    assert peak - vocab * d * e < tokens * vocab * 4 / 8


@pytest.mark.parametrize("upcast", [True, False])
def test_in_place_path_against_reference(upcast: bool) -> None:
    torch.manual_seed(1)
    h = torch.randn(21, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(30, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (21,))
    y[[0, 7]] = -100
    got = chunked_linear_cross_entropy(h, w, b, y, None, chunk=4, upcast=upcast)
    z = h @ w.T + b
    ref = torch.nn.functional.cross_entropy(z.float() if upcast else z, y, reduction="sum")
    assert got.dtype == ref.dtype
    tol = 1e-5 if upcast else 1e-12
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    grads = zip(torch.autograd.grad(got * 3, (h, w, b)), torch.autograd.grad(ref * 3, (h, w, b)))
    for a, c in grads:
        torch.testing.assert_close(a, c, rtol=tol, atol=tol)


def test_cast_only_transform_takes_the_in_place_path() -> None:
    for name, cast in (("mixtral", True), ("granitemoe", None)):
        rev = rf.transform(tiny_model(name))
        head = rev.graph(True, True, True, chunked_head=True).get_submodule("revffn_loss_head")
        assert head.cast is cast, name
