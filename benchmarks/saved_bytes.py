"""Saved-for-backward bytes of one training forward, per method, at two depths.

Reproduces the table in docs/architecture.md:  python benchmarks/saved_bytes.py
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import revffn_fx as rf
from revffn_fx.memory import saved_tensor_bytes

MiB = 2**20


def mixtral_like(depth: int) -> torch.nn.Module:
    cfg = MixtralConfig(vocab_size=1024, hidden_size=256, intermediate_size=512,
                        num_hidden_layers=depth, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=32, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).train()


def main() -> None:
    torch.set_num_threads(2)
    ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(0))
    print("depth | none | checkpoint | revffn | revffn+chunked | revnet | revnet+chunked (MiB)")
    for depth in (4, 16):
        model = mixtral_like(depth)
        row = {"none": saved_tensor_bytes(lambda m=model: m(ids, labels=ids).loss)[0]}
        for coupling in ("revffn", "revnet"):
            for head in ("original", "chunked"):
                rev = rf.transform(model, coupling=coupling, loss_head=head).train()
                key = coupling + ("+chunked" if head == "chunked" else "")
                row[key] = saved_tensor_bytes(lambda r=rev: r(ids, labels=ids).loss)[0]
        model.activation_checkpointing_enable({"use_reentrant": False})
        row["checkpoint"] = saved_tensor_bytes(lambda m=model: m(ids, labels=ids).loss)[0]
        order = ["none", "checkpoint", "revffn", "revffn+chunked", "revnet", "revnet+chunked"]
        print(depth, "|", " | ".join(f"{row[k] / MiB:.2f}" for k in order), flush=True)


if __name__ == "__main__":
    main()
