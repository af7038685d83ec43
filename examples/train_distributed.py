"""Fine-tune a RevModel on several processes: FSDP2 per-layer sharding (default) or DDP.

    revffn-transform examples/tiny-mixtral /tmp/tiny-mixtral-rev --force
    torchrun --nproc_per_node 2 examples/train_distributed.py --model /tmp/tiny-mixtral-rev

gloo on CPU, nccl when CUDA is available (one GPU per rank, ``cuda:LOCAL_RANK``). Each rank
trains on its own rows of the global batch (``--batch`` rows per rank). ``--model`` is a
directory written by ``revffn-transform`` / ``save_pretrained`` (loaded with ``rf.load``)
or a plain Hugging Face directory (transformed here with ``--coupling``; ``--coupling none``
with ``--checkpointing`` is the baseline: the original model under activation
checkpointing, sharded by FSDP2's usual recipe). Tokens are the bytes of ``--data`` modulo
the vocabulary, so any text file works and no tokenizer is needed.

``--measure-memory`` measures one training step after a warm-up step: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU the peak of live tensors seen by torch's
MemTracker (parameters, gradients, optimizer states, activations and temporaries) — the
same quantity, per rank. ``--json PATH`` writes every rank's figures (rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

EXAMPLES = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="example: torchrun --nproc_per_node 2 "
                                       "examples/train_distributed.py --model /tmp/tmx-rev")
    p.add_argument("--model", required=True, help="exported RevModel or Hugging Face model dir")
    p.add_argument("--coupling", default="revffn",
                   help="for a plain Hugging Face dir: revffn, revnet, or none (original)")
    p.add_argument("--checkpointing", action="store_true",
                   help="with --coupling none: activation checkpointing of every layer")
    p.add_argument("--wrap", choices=["fsdp2", "ddp"], default="fsdp2",
                   help="fsdp2: one unit per decoder layer + root; ddp: replicas")
    p.add_argument("--fused", action="store_true",
                   help="AdamW fused into the backward (revffn_fx.training.fuse_optimizer)")
    p.add_argument("--bf16", action="store_true",
                   help="FSDP2 mixed precision: bf16 parameters for compute, fp32 reduce")
    p.add_argument("--offload", action="store_true",
                   help="FSDP2 CPUOffloadPolicy (sharded parameters on the CPU; CUDA only)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="FSDP2: do not all-gather the next layer during this one's compute")
    p.add_argument("--experts", default="eager",
                   help="transformers' experts implementation, the same for every model "
                        "(eager, grouped_mm, ...)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps")
    p.add_argument("--batch", type=int, default=2, help="rows per rank")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--data", default=str(EXAMPLES / "data" / "train.jsonl"),
                   help="any text file: its bytes are the tokens")
    p.add_argument("--measure-memory", action="store_true",
                   help="measure the peak of one step after a warm-up step (per rank)")
    p.add_argument("--json", help="write the per-rank figures here (rank 0)")
    p.add_argument("--out", help="save the fine-tuned model here (rank 0, save_pretrained)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    args = p.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        p.exit(2, f"error: --model {args.model}: no config.json there\n")
    if not Path(args.data).is_file():
        p.exit(2, f"error: --data {args.data}: no such file\n")
    if args.coupling not in ("revffn", "revnet", "momentum", "meft", "none"):
        p.exit(2, f"error: --coupling {args.coupling!r}: choose revffn, revnet, momentum, "
               "meft or none\n")
    if args.checkpointing and args.coupling != "none":
        p.exit(2, "error: --checkpointing is the baseline of --coupling none\n")
    if (args.bf16 or args.offload) and args.wrap != "fsdp2":
        p.exit(2, "error: --bf16 and --offload are FSDP2 options (--wrap fsdp2)\n")
    if args.offload and not torch.cuda.is_available():
        p.exit(2, "error: --offload needs CUDA (FSDP2 offloads from an accelerator)\n")
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < 1:
            p.exit(2, f"error: --{name} must be at least 1\n")
    return args


def load(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    """The model to train, on ``device``, in train mode (not yet wrapped)."""
    import revffn_fx as rf

    config = json.loads((Path(args.model) / "config.json").read_text())
    if "revffn" in config:
        return rf.load(args.model, experts_implementation=args.experts).to(device).train()
    model = rf.load_model(args.model, experts_implementation=args.experts).to(device)
    if args.coupling == "none":
        if args.checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()
    return rf.transform(model, coupling=args.coupling).train()


def wrap(model: torch.nn.Module, args: argparse.Namespace, mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    from revffn_fx import distributed as rd
    from revffn_fx.model import RevModel

    if args.wrap == "ddp":
        dev = next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    kw: dict[str, Any] = {}
    if args.bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    if args.offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if isinstance(model, RevModel):
        return rd.shard(model, mesh, prefetch=not args.no_prefetch, **kw)
    # the original model: FSDP2's usual recipe, one unit per decoder layer + root
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


class Batches:
    """Rows of ``seq + 1`` byte tokens; step s, rank r takes rows of the global batch."""

    def __init__(self, path: str, vocab: int, seq: int, rows: int, world: int,
                 seed: int) -> None:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
        self.tokens = data.long() % vocab
        if len(self.tokens) <= seq:
            raise SystemExit(f"error: --data has {len(self.tokens)} bytes; need more than "
                             f"--seq {seq}")
        self.seq, self.rows, self.world, self.seed = seq, rows, world, seed

    def get(self, step: int, rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq, (self.rows * self.world,),
                               generator=g)[rank * self.rows:(rank + 1) * self.rows]
        return torch.stack([self.tokens[s:s + self.seq] for s in starts.tolist()])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from revffn_fx.training import fuse_optimizer

    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:  # plain `python train_distributed.py`: one rank
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    model = wrap(load(args, device), args, mesh)
    vocab = (getattr(model, "module", model)).config.vocab_size
    data = Batches(args.data, vocab, args.seq + 1, args.batch, world, args.seed)
    if args.fused:
        opt = fuse_optimizer(model, torch.optim.AdamW, lr=args.lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    def step(i: int) -> float:
        ids = data.get(i, rank).to(device)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    result: dict[str, Any] = {"rank": rank, "world": world}
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
        if rank == 0:
            print(f"step {i + 1}/{args.steps} loss {loss:.4f}", flush=True)
    result["seconds_per_step"] = (time.perf_counter() - t0) / args.steps
    result["loss"] = loss
    if args.measure_memory:
        inner_opts = list(getattr(opt, "optimizers", {}).values()) or [opt]
        result["peak_mib"] = measure(lambda: step(args.steps), cuda, model, inner_opts)
    results: list[Any] = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        for r in results:
            print(json.dumps(r), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.out:
        save(model, args, rank)
    dist.destroy_process_group()
    return 0


def measure(fn: Any, cuda: bool, model: torch.nn.Module, opts: list[Any]) -> dict[str, float]:
    """Peak MiB of ``fn()`` on this rank (allocator peak on CUDA, live tensors on CPU:
    the total, and its parts at the peak)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {"Total": torch.cuda.max_memory_allocated() / 2**20}
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(model, *opts)  # parameters, gradients and optimizer states count
    with mt:
        fn()
    peak = mt.get_tracker_snapshot("peak")
    dev = max(peak, key=lambda d: peak[d].get("Total", 0))
    return {str(k).split(".")[-1]: v / 2**20 for k, v in peak[dev].items()}


def save(model: torch.nn.Module, args: argparse.Namespace, rank: int) -> None:
    """Gather the full weights (every rank takes part) and save them from rank 0."""
    from revffn_fx.model import RevModel

    inner = getattr(model, "module", model)
    if isinstance(inner, RevModel):  # sharded or not: every rank calls it, rank 0 writes
        if rank == 0 or any(type(p).__name__ == "DTensor" for p in inner.parameters()):
            inner.save_pretrained(args.out)
        if rank == 0:
            print(f"saved {args.out}", flush=True)
        return
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in inner.named_parameters()}
    if rank == 0:
        copy = load(args, torch.device("cpu"))
        copy.load_state_dict(full, strict=False)
        copy.save_pretrained(args.out)
        print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
