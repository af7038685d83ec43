"""Pretrain the small Mixtral-style model shipped in ``examples/tiny-moe-stdlib/``.

Text: the ``.py`` files of the Python standard library of the running interpreter
(``sysconfig.get_paths()["stdlib"]``), test suites and site-packages left out, in sorted
path order; every ``EVAL_EVERY``-th file is held out for evaluation. A byte-level BPE
tokenizer is trained on the training files with ``tokenizers``; then the model is trained
with AdamW for a fixed number of steps from a fixed seed, on 2 CPU threads:

    python examples/pretrain_tiny_moe.py --out-dir tiny-moe-stdlib --log pretrain.log

The result (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) is written with
``save_pretrained``; ``train_log.json`` in the same directory records the losses. A
non-empty ``--out-dir`` (such as the shipped ``examples/tiny-moe-stdlib``) is refused
before any work unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, MixtralConfig, PreTrainedTokenizerFast

SEED = 0
OUT_DIR = Path("tiny-moe-stdlib")  # in the current directory: never the shipped model
EVAL_EVERY = 20
MAX_CORPUS_BYTES = 24_000_000
VOCAB_SIZE = 4096
SPECIAL = ["<|endoftext|>", "<|pad|>"]
SKIP_PARTS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3"}


def stdlib_files(stdlib: str | None = None) -> list[Path]:
    """The standard library's ``.py`` files, tests and site-packages excluded, sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not SKIP_PARTS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """(train, eval): every ``EVAL_EVERY``-th file (from index ``EVAL_EVERY // 2``) is eval."""
    held = [f for i, f in enumerate(files) if i % EVAL_EVERY == EVAL_EVERY // 2]
    held_set = set(held)
    return [f for f in files if f not in held_set], held


def read_texts(files: list[Path], max_bytes: int) -> list[str]:
    """File contents (UTF-8, undecodable files skipped) up to ``max_bytes`` in total."""
    out, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if total + len(text) > max_bytes:
            break
        out.append(text)
        total += len(text)
    return out


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0],
                                   bos_token=SPECIAL[0], pad_token=SPECIAL[1])


def encode(tok: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and concatenated, each followed by the end-of-text token."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def model_config(tok: PreTrainedTokenizerFast, hidden: int = 128) -> MixtralConfig:
    """4 layers, hidden 128, 8 experts top-2, tied embeddings (about 3.7 M parameters).
    ``hidden``: a wider variant (intermediate 2 x hidden, one head per 32 features)."""
    return MixtralConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=4, num_attention_heads=hidden // 32,
        num_key_value_heads=hidden // 64, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=True,
        router_aux_loss_coef=0.01, output_router_logits=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, dtype="float32")


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator) -> Iterator[
        torch.Tensor]:
    """Endless random windows of ``seq + 1`` tokens, ``batch`` at a time."""
    while True:
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model: torch.nn.Module, data: torch.Tensor, seq: int,
              max_windows: int = 64) -> float:
    """Mean next-token loss over the first ``max_windows`` disjoint windows of ``data``."""
    was = model.training
    model.eval()
    n = min(max_windows, (len(data) - 1) // seq)
    windows = torch.stack([data[i * seq:i * seq + seq] for i in range(n)])
    losses = [model(input_ids=w, labels=w).loss.item() for w in windows.split(16)]
    model.train(was)
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where the model is written (relative to the current directory)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out-dir (e.g. to regenerate the shipped "
                             "examples/tiny-moe-stdlib)")
    parser.add_argument("--steps", type=int, default=1200, help="AdamW steps")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--hidden", type=int, default=128,
                        help="hidden size (128: the shipped model; wider ones for experiments)")
    parser.add_argument("--log", type=Path, default=None, help="also append log lines here")
    args = parser.parse_args()
    if args.out_dir.exists() and any(args.out_dir.iterdir()) and not args.force:
        parser.exit(2, f"error: {args.out_dir} is not empty; pass --force to overwrite it, or "
                       "choose another --out-dir\n")
    torch.set_num_threads(args.threads)
    log_file = args.log.open("a") if args.log else None

    def log(msg: str) -> None:
        print(msg, flush=True)
        if log_file:
            log_file.write(msg + "\n")
            log_file.flush()

    t0 = time.time()
    train_files, eval_files = split_files(stdlib_files())
    train_texts = read_texts(train_files, MAX_CORPUS_BYTES)
    eval_texts = read_texts(eval_files, MAX_CORPUS_BYTES // EVAL_EVERY)
    tok = train_tokenizer(train_texts)
    train_ids, eval_ids = encode(tok, train_texts), encode(tok, eval_texts)
    log(f"files: {len(train_files)} train / {len(eval_files)} eval; tokens: "
        f"{len(train_ids)} train / {len(eval_ids)} eval; vocab {len(tok)}; "
        f"{time.time() - t0:.0f}s")

    torch.manual_seed(SEED)
    # "eager" experts (a loop over experts) run about 10x faster on CPU than grouped_mm
    model = AutoModelForCausalLM.from_config(model_config(tok, args.hidden), dtype=torch.float32,
                                             experts_implementation="eager")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params / 1e6:.2f} M")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(SEED)
    history: list[dict[str, float]] = []
    t_train = time.time()
    running = None
    for step, chunk in zip(range(args.steps), batches(train_ids, args.batch, args.seq, gen)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        out = model(input_ids=chunk[:, :-1].contiguous(), labels=chunk[:, :-1].contiguous())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running = out.loss.item() if running is None else 0.95 * running + 0.05 * out.loss.item()
        if (step + 1) % 50 == 0 or step == 0:
            entry = {"step": step + 1, "train_loss": round(running, 4),
                     "elapsed_s": round(time.time() - t_train, 1)}
            if (step + 1) % 300 == 0 or step + 1 == args.steps:
                entry["eval_loss"] = round(eval_loss(model, eval_ids, args.seq), 4)
            history.append(entry)
            log(json.dumps(entry))
    final_eval = eval_loss(model, eval_ids, args.seq)
    train_s = time.time() - t_train
    log(f"done: {args.steps} steps in {train_s:.0f}s; final eval loss {final_eval:.4f}")

    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tok.save_pretrained(args.out_dir)
    (args.out_dir / "train_log.json").write_text(json.dumps({
        "seed": SEED, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
        "threads": args.threads, "train_tokens": len(train_ids), "eval_tokens": len(eval_ids),
        "parameters": n_params, "train_seconds": round(train_s, 1),
        "final_eval_loss": round(final_eval, 4), "torch": torch.__version__,
        "history": history}, indent=1) + "\n")
    size = sum(p.stat().st_size for p in args.out_dir.iterdir() if p.is_file())
    log(f"wrote {args.out_dir} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
