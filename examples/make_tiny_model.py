"""Regenerate the tiny random-weight Mixtral checkpoint in ``examples/tiny-mixtral/``.

The directory is committed so that examples and tests need no network; run this script
only to rebuild it (the output is deterministic for a given torch/transformers version):

    python examples/make_tiny_model.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

SEED = 0
OUT_DIR = Path(__file__).resolve().parent / "tiny-mixtral"


def tiny_config() -> MixtralConfig:
    """The config of the shipped tiny model: 4 layers, 4 experts, top-2, ~0.6 M parameters."""
    return MixtralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(seed: int = SEED) -> torch.nn.Module:
    """The tiny model with random weights drawn from ``seed`` (fp32, eval mode)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, default=OUT_DIR,
                        help="where the model is written (the default regenerates the "
                             "shipped examples/tiny-mixtral, identical: fixed seed)")
    args = parser.parse_args()
    model = build()
    model.save_pretrained(args.out_dir)
    size = sum(p.stat().st_size for p in args.out_dir.iterdir() if p.is_file())
    print(f"wrote {args.out_dir} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
