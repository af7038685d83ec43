"""The models the benchmarks build, with random weights (no download): ``revffn bench``'s
small synthetic models (:data:`SYNTHETIC`) and ``revffn bench --step``'s presets with the
real models' shapes (:data:`PRESETS`), optionally narrowed; and a local model directory's
config (:func:`source_config`). Heavy imports (torch, transformers) happen inside
functions, so ``revffn --help`` stays fast."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revffn_fx.errors import RevFFNError

if TYPE_CHECKING:
    import torch
    from torch import nn

# ------------------------------------------------------------------------ synthetic models

_SYNTHETIC_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      max_position_embeddings=4096)

#: name -> (model_type, config keyword arguments without the layer count).
SYNTHETIC: dict[str, tuple[str, dict[str, Any]]] = {
    # the reference config of docs/benchmarks.md
    "mixtral-like": ("mixtral", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, **_SYNTHETIC_IDS)),
    # Qwen1.5-MoE shape: many small experts, top-4, plus a gated shared expert
    "qwen2-moe-like": ("qwen2_moe", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=8, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, shared_expert_intermediate_size=512,
        decoder_sparse_step=1, **_SYNTHETIC_IDS)),
    # DeepSeek-V3 shape: MLA attention, routed + shared experts, the first layer dense
    "deepseek-v3-like": ("deepseek_v3", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
        topk_group=2, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, **_SYNTHETIC_IDS)),
    # for tests: seconds on a CPU
    "tiny": ("mixtral", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_SYNTHETIC_IDS)),
}


def synthetic_config(name: str, layers: int) -> Any:
    """The config object of the synthetic model ``name`` with ``layers`` decoder layers."""
    if name not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {name!r}; choose from "
                          f"{', '.join(SYNTHETIC)}")
    if layers < 1:
        raise RevFFNError(f"a model needs at least one layer, got {layers}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, kw = SYNTHETIC[name]
    return CONFIG_MAPPING[model_type](num_hidden_layers=layers, **kw)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name (``bfloat16``, ``torch.float32``); None:
    float32."""
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise RevFFNError(f"unknown dtype {dtype!r}; use e.g. float32 or bfloat16")
        return value
    return dtype


def build(name: str, layers: int, dtype: torch.dtype | str | None = None,
          seed: int = 0) -> nn.Module:
    """A random-weight synthetic causal LM (``AutoModelForCausalLM.from_config``), train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from revffn_fx.frontend.registry import facts_for

    config = synthetic_config(name, layers)
    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(facts_for(config.model_type).load_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), **kw)
    return model.train()


def synthetic_factory(name: str, dtype: torch.dtype | str | None = None,
                      seed: int = 0) -> Callable[[int], nn.Module]:
    """``depth -> model`` for :func:`run_bench`; checks ``name`` at once."""
    synthetic_config(name, 1)
    factory = lambda depth: build(name, depth, dtype, seed)  # noqa: E731
    factory.label = name  # type: ignore[attr-defined]
    return factory


# ------------------------------------------------------------------ presets with real shapes

_PRESET_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

#: name -> (model_type, overrides of transformers' default config, which for these three is
#: the real model's: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, DeepSeek-V3)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-shaped": ("mixtral", dict(vocab_size=32000, hidden_size=4096,
                                       intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, num_local_experts=8,
                                       num_experts_per_tok=2, num_hidden_layers=32)),
    "qwen1.5-moe-shaped": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        decoder_sparse_step=1, num_hidden_layers=24)),
    "deepseek-v3-shaped": ("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=3, n_group=8, topk_group=4, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        num_hidden_layers=61)),
}
_WIDTHS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
           "kv_lora_rank", "q_lora_rank")


def preset_config(name: str, layers: int | None = None, hidden: int | None = None,
                  vocab: int | None = None, max_positions: int = 8192) -> Any:
    """The config of preset ``name``, optionally with fewer ``layers`` and a narrower
    ``hidden`` size: feed-forward and low-rank widths and the head count scale with it (head
    dimensions are kept), the vocabulary and expert counts stay real unless ``vocab``."""
    if name not in PRESETS:
        raise RevFFNError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, real = PRESETS[name]
    kw = {**real, **_PRESET_IDS, "max_position_embeddings": max_positions}
    if layers is not None:
        if layers < 1:
            raise RevFFNError(f"a model needs at least one layer, got {layers}")
        kw["num_hidden_layers"] = layers
    if hidden is not None and hidden != real["hidden_size"]:
        if hidden < 16 or hidden % 16:
            raise RevFFNError(f"--hidden must be a positive multiple of 16, got {hidden}")
        f = hidden / real["hidden_size"]
        head_dim = real["hidden_size"] // real["num_attention_heads"]
        for key in _WIDTHS:
            if key in kw:
                kw[key] = max(16, round(kw[key] * f / 16) * 16)
        heads = max(1, round(real["num_attention_heads"] * f))
        kv = max(1, round(real["num_key_value_heads"] * f))
        kw.update(hidden_size=hidden, num_attention_heads=heads,
                  num_key_value_heads=kv if heads % kv == 0 else 1)
        if model_type != "deepseek_v3":  # MLA head dims are their own settings
            kw["head_dim"] = head_dim
    if vocab is not None:
        kw["vocab_size"] = vocab
    if kw.get("first_k_dense_replace", 0) >= kw["num_hidden_layers"]:
        kw["first_k_dense_replace"] = max(0, kw["num_hidden_layers"] - 1)
    return CONFIG_MAPPING[model_type](**kw)


def build_model(config: Any, dtype: Any = None, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A random-weight causal LM from ``config`` (fixed seed), in train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from revffn_fx.frontend.registry import facts_for

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(facts_for(config.model_type).load_kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **kw)
    return model.train()


def source_config(model_dir: str | None, synthetic: str | None, layers: int | None,
                  hidden: int | None = None, vocab: int | None = None,
                  max_positions: int = 8192) -> tuple[Any, str]:
    """(config, label) for ``bench --step``: a local model directory's config (weights are
    not read: random weights have the same memory), a preset, or a bench synthetic model."""
    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise RevFFNError(f"{model_dir}: not a model directory (no config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RevFFNError(f"{model_dir}: cannot read its config: "
                              f"{str(e).splitlines()[0]}") from None
        if layers is not None:
            config.num_hidden_layers = layers
        if vocab is not None:
            config.vocab_size = vocab
        return config, model_dir
    assert synthetic is not None
    if synthetic in PRESETS:
        return preset_config(synthetic, layers, hidden, vocab, max_positions), synthetic
    if synthetic in SYNTHETIC:
        config = synthetic_config(synthetic, layers or 4)
        if vocab is not None:
            config.vocab_size = vocab
        return config, synthetic
    raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                      f"{', '.join([*PRESETS, *SYNTHETIC])}")
