"""Tiny models for tests: every supported Hugging Face MoE architecture, plus hand-written ones.

Models are built from config objects (never downloaded). ``tiny_model(name)`` builds one with
fixed-seed random weights; ``save_and_load`` round-trips an HF model through a directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from revffn_fx.frontend.registry import facts_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs, never fetched

ARCHS = [
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "granitemoe",
    "phimoe", "dbrx", "jetmoe", "minimax", "flex_olmo",
]

_COMMON: dict[str, Any] = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128,
    tie_word_embeddings=False,
)

_PER_ARCH: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=1),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                        kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5,
                       embedding_multiplier=2.0, attention_multiplier=0.25,
                       logits_scaling=2.0),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, block_size=4,
                    layer_types=["linear_attention", "full_attention"]),
}


# Switch on the randomness some architectures have in train mode, so RNG replay is tested:
# dbrx dropout, mixtral router jitter, phimoe input jitter and sampled routing (its
# sampling only picks among experts within 2 * router_jitter_noise of the best score).
RANDOM = {"dbrx": dict(resid_pdrop=0.1, emb_pdrop=0.1), "mixtral": dict(router_jitter_noise=0.1),
          "phimoe": dict(router_jitter_noise=0.5, input_jitter_noise=0.1)}


def _layer_types(kind: str, n: int) -> list[str]:
    """Alternate layer types for configs that list one per layer."""
    first = "sliding_attention" if kind == "gpt_oss" else "linear_attention"
    return [first if i % 2 == 0 else "full_attention" for i in range(n)]


def tiny_config(name: str, **overrides: Any) -> Any:
    """The config object of a tiny ``name`` model (hidden 64, 2 layers, 4 experts, top-2)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[name]
    n_layers = overrides.pop("num_hidden_layers", None)
    if name == "dbrx":
        kw: dict[str, Any] = dict(
            d_model=64, n_heads=4, n_layers=n_layers or 2, max_seq_len=128, vocab_size=128,
            attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
            ffn_config=dict(hidden_size=64, ffn_hidden_size=96, moe_num_experts=4,
                            moe_top_k=2),
            tie_word_embeddings=False)
    elif name == "jetmoe":
        kw = dict(vocab_size=128, hidden_size=64, num_hidden_layers=n_layers or 2,
                  num_key_value_heads=2, kv_channels=16, intermediate_size=96,
                  num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
                  tie_word_embeddings=False)
    else:
        kw = dict(_COMMON, **_PER_ARCH.get(name, {}))
        if n_layers is not None:
            kw["num_hidden_layers"] = n_layers
            if "layer_types" in kw:
                kw["layer_types"] = _layer_types(name, n_layers)
    # token ids inside the tiny vocabulary (several defaults point past it)
    kw.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return cls(**kw)


def _build_kwargs(name: str, dtype: torch.dtype) -> dict[str, Any]:
    kw: dict[str, Any] = dict(facts_for(name).load_kwargs)
    kw["dtype"] = dtype
    if dtype == torch.float64:
        kw.setdefault("experts_implementation", "eager")
    return kw


def tiny_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
               **overrides: Any) -> nn.Module:
    """A tiny random-weight causal LM: an HF architecture from :data:`ARCHS`, or ``"hand"``."""
    torch.manual_seed(seed)
    if name == "hand":
        return HandMoE(**overrides).to(dtype)
    if name in HAND_LMS:
        return HAND_LMS[name](**overrides).to(dtype)
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(name, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, **_build_kwargs(name, dtype))
    model._revffn_zoo = (name, dtype)  # remembered for save_and_load
    return model


def qwen15_moe_config(**overrides: Any) -> Any:
    """Qwen1.5-MoE-A2.7B's shape (24 layers, hidden 2048, 60 experts top-4, vocab 151936,
    bf16): a config only, for planning figures at a real scale (never instantiated)."""
    from transformers import Qwen2MoeConfig

    kw: dict[str, Any] = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        decoder_sparse_step=1, tie_word_embeddings=False, dtype="bfloat16")
    return Qwen2MoeConfig(**{**kw, **overrides})


def save_and_load(model: nn.Module, tmp_path: str | Path) -> nn.Module:
    """save_pretrained ``model`` into ``tmp_path`` and load it back with the same kwargs."""
    from transformers import AutoModelForCausalLM

    name, dtype = getattr(model, "_revffn_zoo", (model.config.model_type, model.dtype))
    path = Path(tmp_path) / f"{name}-model"
    model.save_pretrained(path)
    loaded = AutoModelForCausalLM.from_pretrained(path, **_build_kwargs(name, dtype))
    loaded.train(model.training)
    return loaded


# --------------------------------------------------------------------------------------
# A hand-written MoE causal LM (no transformers).


class HandAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class HandExpert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class HandMoEBlock(nn.Module):
    """Top-k routed experts with a data-dependent loop over the experts that were hit."""

    def __init__(self, hidden: int, inner: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, n_experts, bias=False)
        self.experts = nn.ModuleList(HandExpert(hidden, inner) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            tok, slot = (chosen == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.experts[e](x[tok]) * weights[tok, slot, None])
        return out.view(shape)


class HandBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int,
                 top_k: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(hidden)
        self.attn = HandAttention(hidden, heads)
        self.moe_norm = nn.LayerNorm(hidden)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.moe(self.moe_norm(x))


class HandMoE(nn.Module):
    """A plain-PyTorch MoE causal LM with the calling convention of an HF ``*ForCausalLM``."""

    def __init__(self, vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
                 inner: int = 96, n_experts: int = 4, top_k: int = 2,
                 max_len: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(
            HandBlock(hidden, heads, inner, n_experts, top_k) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, use_cache: bool | None = None,
                **kw: Any) -> SimpleNamespace:
        x = self.embed(input_ids)
        t = input_ids.shape[1]
        allowed = self.causal[None, None, :t, :t]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        mask = torch.zeros_like(allowed, dtype=x.dtype).masked_fill(~allowed, -1e9)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.lm_head(self.norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


# --------------------------------------------------------------------------------------
# Hand-written MoE LMs with their own calling conventions and residual forms
# (``tiny_model("gpt" | "tokens" | "parallel" | "three")``).


class ParallelBlock(nn.Module):
    """GPT-J style parallel residual: ``x + attn(n(x)) + moe(n(x))``, one shared norm."""

    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int,
                 top_k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.attn = HandAttention(hidden, heads)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.attn(h, mask) + self.moe(h)


class ThreeBlock(nn.Module):
    """Three residual sublayers: two attention sublayers, then a MoE."""

    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int,
                 top_k: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(hidden) for _ in range(3))
        self.attn1 = HandAttention(hidden, heads)
        self.attn2 = HandAttention(hidden, heads)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask)
        x = x + self.attn2(self.norm2(x), mask)
        return x + self.moe(self.norm3(x))


class SkipBlock(nn.Module):
    """A MoE shortcut that skips a sublayer: attention, a dense MLP, and a MoE that reads
    the layer input, ``h = x + attn(n1(x)); out = h + mlp(n2(h)) + moe(n3(x))``."""

    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int,
                 top_k: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(hidden) for _ in range(3))
        self.attn = HandAttention(hidden, heads)
        self.mlp = HandExpert(hidden, inner)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(self.norm1(x), mask)
        return h + self.mlp(self.norm2(h)) + self.moe(self.norm3(x))


class GPTMoE(nn.Module):
    """A GPT-style MoE LM: ``forward(input_ids, labels=None) -> (logits, loss)``; learned
    positions, a causal mask from a buffer, loss computed by the model itself."""

    block_class: type[nn.Module] = HandBlock

    def __init__(self, vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
                 inner: int = 96, n_experts: int = 4, top_k: int = 2,
                 max_len: int = 64) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_len, hidden)
        self.h = nn.ModuleList(self.block_class(hidden, heads, inner, n_experts, top_k)
                               for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("bias", torch.full((max_len, max_len), -1e9).triu(1),
                             persistent=False)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        mask = self.bias[:t, :t].to(x.dtype)
        for block in self.h:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.hidden(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1))
        return logits, loss


class TokensMoE(GPTMoE):
    """``forward(tokens) -> logits``: no labels, no loss."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.hidden(tokens)


class ParallelMoE(GPTMoE):
    """GPT-style LM of parallel-residual MoE blocks (:class:`ParallelBlock`)."""

    block_class = ParallelBlock


class ThreeMoE(GPTMoE):
    """GPT-style LM whose layers have three residual sublayers (:class:`ThreeBlock`)."""

    block_class = ThreeBlock


class SkipMoE(GPTMoE):
    """GPT-style LM whose MoE skips a sublayer (:class:`SkipBlock`)."""

    block_class = SkipBlock


HAND_LMS: dict[str, type[nn.Module]] = {"gpt": GPTMoE, "tokens": TokensMoE,
                                        "parallel": ParallelMoE, "three": ThreeMoE,
                                        "skip": SkipMoE}


# Hugging Face dense architectures with a parallel residual (x + attn(n(x)) + mlp(n'(x))),
# for the generalised residual analysis
PARALLEL_HF: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=128,
                     use_parallel_residual=True),
    "cohere": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128),
    "gptj": dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8),
}


def tiny_parallel_hf(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny random-weight HF model of :data:`PARALLEL_HF`."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(seed)
    cfg = CONFIG_MAPPING[name](**PARALLEL_HF[name], pad_token_id=0, bos_token_id=1,
                               eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)
