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


# --------------------------------------------------------------------------------------
# Issue 27: models the project had not seen (``tiny_model(name)`` for a name in
# :data:`UNSEEN`). Every one converts exactly with no leaf_modules given, except the
# residual forms that are not x + f(x) (:data:`REFUSED_FORMS`), refused with the form named.


class FusedSdpaAttention(nn.Module):
    """One fused qkv projection and ``F.scaled_dot_product_attention(is_causal=True)``:
    no mask argument, so only a probe can tell it mixes tokens."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, h))


class ShapeMaskAttention(HandAttention):
    """Builds its causal mask from traced shapes (``torch.ones(t, t).triu``)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=x.dtype, device=x.device).triu(1) * -1e9
        return super().forward(x, causal if mask is None else mask + causal)


class ConvMixer(nn.Module):
    """A causal depthwise-convolution token mixer (mamba/short-conv style): a mixer."""

    def __init__(self, hidden: int, width: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.conv = nn.Conv1d(hidden, hidden, width, groups=hidden, padding=width - 1)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, gate = self.in_proj(x).chunk(2, dim=-1)
        u = self.conv(u.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
        return self.out_proj(u * F.silu(gate))


class PaddingMoE(HandMoEBlock):
    """A MoE that also takes the padding mask (zeroing padded tokens): it consumes a layer
    input besides the hidden state, yet is no token mixer."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        return out if keep is None else out * keep[..., None].to(out.dtype)


class NormedMoE(nn.Module):
    """A norm and a MoE in one container (traced through, like dbrx's norm_attn_norm)
    whose forward branches on a tensor value, so torch.fx cannot trace it: kept whole
    automatically, as it feeds the MoE branch only."""

    def __init__(self, hidden: int, inner: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if bool(h.isnan().any()):
            raise FloatingPointError("nan")
        return self.moe(h)


class LayerContext:
    """A custom argument object handed to every layer (the model's own calling convention;
    torch.fx cannot put it in a graph, as transformers' ``KVSharingDict``)."""

    def __init__(self, mask: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        self.mask, self.keep = mask, keep
        self.shared: dict[int, torch.Tensor] = {}  # written by "shared_kv" blocks


class ZooBlock(nn.Module):
    """``x + attn(n1(x)) + moe(n2(x))`` in sequence, with the attention, the MoE and the
    residual form chosen by name (see :data:`ZOO_BLOCKS`)."""

    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int, top_k: int,
                 attn: str = "hand", moe: str = "hand", form: str = "plain") -> None:
        super().__init__()
        self.attn_kind, self.moe_kind, self.form = attn, moe, form
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = {"hand": lambda: HandAttention(hidden, heads),
                     "sdpa": lambda: FusedSdpaAttention(hidden, heads),
                     "shape": lambda: ShapeMaskAttention(hidden, heads),
                     "conv": lambda: ConvMixer(hidden)}[attn]()
        self.moe = {"hand": lambda: HandMoEBlock(hidden, inner, n_experts, top_k),
                    "padding": lambda: PaddingMoE(hidden, inner, n_experts, top_k),
                    "guarded": lambda: NormedMoE(hidden, inner, n_experts, top_k)}[moe]()
        if form == "gated":
            self.gate = nn.Linear(hidden, hidden)
        if form == "affine":
            self.w = nn.Parameter(torch.full((hidden,), 0.9))
            self.b = nn.Parameter(torch.zeros(hidden))

    def mix(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = self.n1(x)
        if self.attn_kind == "hand":
            return self.attn(h, mask)
        return self.attn(h) if self.attn_kind != "shape" else self.attn(h, mask)

    def ffn(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        h = x if self.moe_kind == "guarded" else self.n2(x)
        return self.moe(h, keep) if self.moe_kind == "padding" else self.moe(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, ctx: LayerContext | None = None,
                carry: torch.Tensor | None = None) -> Any:
        if ctx is not None:
            mask, keep = ctx.mask, ctx.keep
        if self.form == "shared_kv":  # keys shared with the next layer, through ctx
            h = self.n1(x)
            prev = ctx.shared.get(len(ctx.shared) - 1)
            ctx.shared[len(ctx.shared)] = h
            x = x + self.attn(h if prev is None else h + 0 * prev, mask)
            return x + self.ffn(x, keep)
        if self.form == "handoff":  # returns state that the next layer reads
            if carry is not None:
                mask = mask + (carry[:, None, None, :] * 0).to(mask.dtype)
            x = x + self.mix(x, mask)
            x = x + self.ffn(x, keep)
            return x, x.abs().argmax(-1)
        form = self.form
        if form == "scaled":  # a*x + b*f(x)
            x = 0.5 * x + 2.0 * self.mix(x, mask)
            return 0.5 * x + 2.0 * self.ffn(x, keep)
        if form == "gated":  # (1-g)*x + g*f(x)
            g = torch.sigmoid(self.gate(x))
            x = (1 - g) * x + g * self.mix(x, mask)
            return x + self.ffn(x, keep)
        if form == "affine":  # w*x + c + f(x)
            x = self.w * x + self.b + self.mix(x, mask)
            return x + self.ffn(x, keep)
        if form == "post_norm":  # norm(x + f(x)), the original transformer
            x = self.n1(x + self.attn(x, mask))
            return self.n2(x + self.moe(x))
        x = x + self.mix(x, mask)
        return x + self.ffn(x, keep)


class ZooLM(nn.Module):
    """A GPT-style MoE LM: ``forward(input_ids, attention_mask=None, labels=None,
    position_ids=None) -> dict(logits, loss)``, its blocks held in ``container``
    ("list": nn.ModuleList, "dict": nn.ModuleDict, "seq": nn.Sequential of blocks that
    build their own mask, "attr": a plain list attribute of blocks registered as
    ``block_0``, ...) and its forward written ``style``:

    - "plain": traceable;
    - "branchy": data-dependent Python control flow (a check on the ids, a loop bound
      read off the mask) that torch.fx cannot trace;
    - "context": a :class:`LayerContext` object handed to every layer;
    The causal mask is always built from traced shapes (``torch.ones(t, t).tril()``),
    with a document mask where ``position_ids`` restart (packed sequences).
    """

    def __init__(self, vocab: int = 128, hidden: int = 64, layers: int = 2, heads: int = 4,
                 inner: int = 96, n_experts: int = 4, top_k: int = 2, max_len: int = 64,
                 container: str = "list", style: str = "plain", **block: Any) -> None:
        super().__init__()
        self.container, self.style = container, style
        self.wte = nn.Embedding(vocab, hidden)
        self.wpe = nn.Embedding(max_len, hidden)
        blocks = [ZooBlock(hidden, heads, inner, n_experts, top_k, **block)
                  for _ in range(layers)]
        if container == "dict":
            self.blocks = nn.ModuleDict({f"layer{i}": b for i, b in enumerate(blocks)})
        elif container == "seq":
            self.blocks = nn.Sequential(*blocks)
        elif container == "attr":
            for i, b in enumerate(blocks):
                self.add_module(f"block_{i}", b)
            self.layers = blocks  # a plain list: not a registered container
        else:
            self.blocks = nn.ModuleList(blocks)
        self.ln_f = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def _blocks(self) -> list[nn.Module]:
        if self.container == "attr":
            return list(self.layers)
        return list(self.blocks.values() if self.container == "dict" else self.blocks)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
                ) -> dict[str, Any]:
        b, t = input_ids.shape
        if self.style == "branchy" and bool((input_ids < 0).any()):
            raise ValueError("negative token id")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)[None].expand(b, t)
        x = self.wte(input_ids) + self.wpe(position_ids)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        # a document mask: a token sees the tokens of its own document (positions restart)
        doc = (position_ids == 0).cumsum(-1)
        allowed = causal[None] & (doc[:, :, None] == doc[:, None, :])
        keep = None
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool()
            keep = attention_mask
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~allowed, -1e9)[:, None]
        if self.style == "branchy":
            for _ in range(int(attention_mask.sum()) % 1 if attention_mask is not None else 0):
                pass  # a loop bound read off a tensor value
        carry = None
        for block in self._blocks():
            if self.container == "seq":
                x = block(x)
            elif self.style == "context":
                x = block(x, ctx=LayerContext(mask, keep))
            elif block.form == "handoff":
                x, carry = block(x, mask, keep, carry=carry)
            else:
                x = block(x, mask, keep)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return {"logits": logits, "loss": loss}


class HyperBlock(nn.Module):
    """Hyper-connections: the residual is ``n`` streams (batch, seq, n, hidden) mixed by a
    learned matrix at every update, ``H x + beta f(alpha x)``: not x + f(x)."""

    def __init__(self, hidden: int, heads: int, inner: int, n_experts: int, top_k: int,
                 n: int = 2) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = HandAttention(hidden, heads)
        self.moe = HandMoEBlock(hidden, inner, n_experts, top_k)
        self.alpha = nn.Parameter(torch.full((2, n), 1.0 / n))
        self.mix = nn.Parameter(torch.eye(n).repeat(2, 1, 1) * 0.9 + 0.05)
        self.beta = nn.Parameter(torch.ones(2, n))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("btnh,n->bth", h, self.alpha[0])
        y = self.attn(self.n1(x), mask)
        h = torch.einsum("btnh,nm->btmh", h, self.mix[0]) + y[:, :, None] * self.beta[0][:, None]
        x = torch.einsum("btnh,n->bth", h, self.alpha[1])
        y = self.moe(self.n2(x))
        return torch.einsum("btnh,nm->btmh", h, self.mix[1]) + y[:, :, None] * self.beta[1][:, None]


class HyperLM(GPTMoE):
    """GPT-style LM over hyper-connection blocks (:class:`HyperBlock`), two streams."""

    block_class = HyperBlock

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        mask = self.bias[:t, :t].to(x.dtype)
        h = x[:, :, None].expand(-1, -1, 2, -1).contiguous()
        for block in self.h:
            h = block(h, mask)
        return self.lm_head(self.ln_f(h.sum(2)))


# name -> ZooLM keywords; the expected sublayer labels of each layer, and whether it converts
UNSEEN: dict[str, dict[str, Any]] = {
    "untraceable": dict(style="branchy"),
    "context_object": dict(style="context", moe="padding"),
    "shape_mask": dict(attn="shape"),
    "moduledict": dict(container="dict"),
    "sequential": dict(container="seq", attn="shape"),
    "list_attr": dict(container="attr"),
    "auto_leaf": dict(moe="guarded"),
    "sdpa_fused_qkv": dict(attn="sdpa"),
    "padding_moe": dict(moe="padding"),
    "conv_mixer": dict(attn="conv"),
    "handoff": dict(form="handoff"),
    "shared_kv": dict(style="context", form="shared_kv"),
    "scaled": dict(form="scaled"),
    "gated": dict(form="gated"),
    "affine": dict(form="affine"),
    "post_norm": dict(form="post_norm"),
    "hyper": {},
}
# the residual forms that are not x + f(x): refused, with the form named
REFUSED_FORMS = {"scaled": "scaled", "gated": "gated", "affine": "affine",
                 "post_norm": "post-norm", "hyper": "hyper-connection"}
UNSEEN_KINDS = {name: ["attention", "moe"] for name in UNSEEN}
UNSEEN_KINDS["conv_mixer"] = ["mixer", "moe"]


def unseen_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny model of :data:`UNSEEN`."""
    torch.manual_seed(seed)
    if name == "hyper":
        return HyperLM().to(dtype)
    return ZooLM(**UNSEEN[name]).to(dtype)


# Hugging Face architectures the project had not covered (transformers 5.25): what each
# shows. Built from a config with the keys below on top of :data:`_UNSEEN_COMMON`.
_UNSEEN_COMMON: dict[str, Any] = dict(
    _COMMON, num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DSA = dict(n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, num_key_value_heads=4)
UNSEEN_HF: dict[str, dict[str, Any]] = {
    "qwen3_5_moe_text": {},  # model-level forward untraceable: layers traced alone
    "deepseek_v32": _DSA,  # attention untraceable: kept whole automatically
    "bailing_hybrid": {},  # linear attention calling an unregistered module: kept whole
    "jamba": {},  # mamba mixers
    "glm_moe_dsa": _DSA,  # hands top-k indices to the next layer: refused
    "gemma4_text": {},  # model-level untraceable, and scales the stream: refused (scaled)
    "ergo": {},  # a residual gate module, learned per-channel weights: refused (affine)
    "doge": {},  # learned residual weights: refused (affine)
    "deepseek_v4": {},  # hyper-connections: refused (hyper-connection)
    "qwen4_exp_text": {},  # untraceable; hyper-connection streams side by side: refused
    "inkling2_text": {},  # untraceable; depth-attention residuals (block_states): refused
}


def unseen_hf(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny random-weight model of :data:`UNSEEN_HF`."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    torch.manual_seed(seed)
    cfg = CONFIG_MAPPING[name](**{**_UNSEEN_COMMON, **UNSEEN_HF[name]})
    kw: dict[str, Any] = {"dtype": dtype}
    if dtype == torch.float64:
        kw["experts_implementation"] = "eager"
    return AutoModelForCausalLM.from_config(cfg, **kw)
