"""Generate a random ~2.4 GB fp32 Mixtral checkpoint shard by shard, in little memory.

The figures in docs/export.md were measured on it:

    python benchmarks/make_big_checkpoint.py /tmp/big
    /usr/bin/time -v revffn-transform /tmp/big /tmp/big-rev            # without --verify
    /usr/bin/time -v revffn-transform /tmp/big /tmp/big-rev2 --verify
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig
from transformers.core_model_loading import revert_weight_conversion


def main(out: Path, limit: int = 1_000_000_000) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cfg = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584,
                        num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                        head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, tie_word_embeddings=False, dtype="float32")
    with torch.device("meta"):  # the structure only: no weights in memory
        model = AutoModelForCausalLM.from_config(cfg)
    disk = revert_weight_conversion(model, model.state_dict())  # on-disk names and shapes
    shards: list[dict[str, tuple[int, ...]]] = []
    cur: dict[str, tuple[int, ...]] = {}
    size = 0
    for name, t in disk.items():
        n = t.numel() * 4
        if cur and size + n > limit:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tuple(t.shape)
        size += n
    shards.append(cur)
    weight_map: dict[str, str] = {}
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.ones(s) if k.endswith("norm.weight")
                   else torch.randn(s, generator=gen) * 0.02 for k, s in shard.items()}
        save_file(tensors, out / fn, metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
        weight_map.update({k: fn for k in shard})
        print("wrote", fn, flush=True)
    total = sum(t.numel() * 4 for t in disk.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    print(f"total {total / 1e9:.2f} GB in {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out_dir", type=Path,
                        help="directory to write the checkpoint to (about 2.4 GB)")
    parser.add_argument("--shard-bytes", type=int, default=1_000_000_000,
                        help="largest shard written, in bytes")
    args = parser.parse_args()
    main(args.out_dir, args.shard_bytes)
