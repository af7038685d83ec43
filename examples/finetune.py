"""Fine-tune a reversible (or plain) MoE causal LM on a prompt/completion JSONL dataset.

    python examples/finetune.py --coupling revffn --two-stage --max-steps 300 \\
        --output-dir /tmp/ft-revffn

``--model`` is a Hugging Face model directory (transformed here with ``--coupling``;
``--coupling none`` fine-tunes the original model) or a directory written by
``revffn-transform`` / ``RevModel.save_pretrained`` (loaded with ``rf.load``). Each JSONL
line holds ``prompt`` and ``completion``; the loss covers the completion and the end-of-text
token only. The Trainer reports progress and eval loss; at the end the script measures
exact-match accuracy by greedy decoding and saves the model and tokenizer to
``<output-dir>/final`` with ``save_pretrained`` (``rf.load`` reads a RevModel back).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import revffn_fx as rf
from revffn_fx.training.two_stage import TwoStageCallback

EXAMPLES = Path(__file__).resolve().parent
DEFAULT_MODEL = EXAMPLES / "tiny-moe-stdlib"
DEFAULT_DATA = EXAMPLES / "data"


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """The rows of a JSONL file (each with ``prompt`` and ``completion``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for r in rows:
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("completion"), str):
            raise ValueError(f"{path}: every line needs string 'prompt' and 'completion'")
    return rows


def load_for_finetune(model_dir: str | Path, coupling: str = "revffn",
                      experts_implementation: str | None = "eager",
                      device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model to fine-tune (train mode): a RevModel, or the original when coupling="none".

    A directory with a ``revffn`` section in its config is loaded with ``rf.load`` (its
    recorded coupling wins). ``experts_implementation="eager"`` (a loop over experts) is
    much faster than ``grouped_mm`` on CPU; it applies to plain model directories. The
    model is moved to ``device`` before the transform, so the compiled graphs trace there.
    """
    path = Path(model_dir)
    config = json.loads((path / "config.json").read_text())
    if "revffn" in config:
        from revffn_fx.export import load

        return load(path).to(device).train()
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = rf.load_model(path, **kw).to(device)
    if coupling == "none":
        return model.train()
    return rf.transform(model, coupling=coupling).train()


def calibrate_on_rows(model: torch.nn.Module, tok: PreTrainedTokenizerBase,
                      rows: list[dict[str, str]], seq: int = 128, batch: int = 8) -> str:
    """Fit a revffn model's adapters (rf.calibrate) on training examples (prompt +
    completion, packed into windows of ``seq`` tokens); streams then carried in fp64
    (fp32 for 16-bit models) so the backward stays exact. Returns the report's summary."""
    from revffn_fx.calibration import token_windows
    from revffn_fx.runtime.layers import wider_stream_dtype

    device = next(model.parameters()).device
    windows = token_windows(tok, [r["prompt"] + r["completion"] for r in rows], seq=seq,
                            batch=batch)
    report = rf.calibrate(model, [w.to(device) for w in windows])
    model.options.stream_dtype = wider_stream_dtype(next(model.parameters()).dtype)
    return report.summary()


def encode(rows: list[dict[str, str]], tok: PreTrainedTokenizerBase,
           max_len: int = 128) -> list[dict[str, list[int]]]:
    """Tokenize prompt and completion separately; labels are -100 over the prompt."""
    out = []
    for r in rows:
        p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + c)[:max_len]
        out.append({"input_ids": ids, "labels": ([-100] * len(p) + c)[:max_len]})
    return out


class Collator:
    """Right-pads a batch; padded positions get label -100 and attention mask 0."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, feats: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(feats), n), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), n), dtype=torch.long)
        for i, f in enumerate(feats):
            k = len(f["input_ids"])
            ids[i, :k] = torch.tensor(f["input_ids"])
            labels[i, :k] = torch.tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tok: PreTrainedTokenizerBase, prompts: list[str],
                   max_new_tokens: int = 4, batch_size: int = 64) -> list[str]:
    """Greedy continuation of each prompt, cut at end-of-text or newline.

    A loop over the forward (which returns logits in eval mode) on prompts grouped by token
    length, so no padding is needed; it works alike for RevModel and the original model.
    """
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        by_len[len(ids)].append(i)
    answers = [""] * len(prompts)
    for idx in by_len.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], device=device)
            start = ids.shape[1]
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            for row, i in zip(ids[:, start:].tolist(), chunk):
                eos = tok.eos_token_id
                row = row[:row.index(eos)] if eos in row else row
                answers[i] = tok.decode(row).split("\n")[0].strip()
    model.train(was)
    return answers


def exact_match(model: torch.nn.Module, tok: PreTrainedTokenizerBase,
                rows: list[dict[str, str]]) -> float:
    """Percentage of rows whose greedy answer equals the stripped completion."""
    got = greedy_answers(model, tok, [r["prompt"] for r in rows])
    return 100.0 * sum(g == r["completion"].strip() for g, r in zip(got, rows)) / len(rows)


class History(TrainerCallback):
    """Keeps every logged record (train loss, eval loss, lr) with its step."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        if logs:
            self.records.append({"step": state.global_step, **logs})


def training_args(output_dir: str | Path, max_steps: int, lr: float, batch_size: int = 16,
                  eval_steps: int = 50, seed: int = 0, **overrides: Any) -> TrainingArguments:
    """The TrainingArguments this example (and benchmarks/quality.py) uses: CPU, cosine."""
    kw: dict[str, Any] = dict(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=lr,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 20), weight_decay=0.0,
        eval_strategy="steps", eval_steps=eval_steps, logging_steps=max(1, eval_steps // 2),
        save_strategy="no", report_to=[], use_cpu=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, remove_unused_columns=False)
    kw.update(overrides)
    return TrainingArguments(**kw)


def finetune(model: torch.nn.Module, tok: PreTrainedTokenizerBase,
             train_rows: list[dict[str, str]], eval_rows: list[dict[str, str]],
             args: TrainingArguments, two_stage: TwoStageCallback | None = None,
             eval_limit: int | None = None,
             optimizer: torch.optim.Optimizer | None = None) -> tuple[Trainer, History]:
    """Run the Trainer; return it and the logged history."""
    history = History()
    callbacks: list[TrainerCallback] = [history] + ([two_stage] if two_stage else [])
    evals = eval_rows[:eval_limit] if eval_limit else eval_rows
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows, tok),
                      eval_dataset=encode(evals, tok), data_collator=Collator(tok.pad_token_id),
                      callbacks=callbacks, optimizers=(optimizer, None))
    trainer.train()
    return trainer, history


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="local model directory to fine-tune")
    parser.add_argument("--train", type=Path, default=DEFAULT_DATA / "train.jsonl",
                        help="training JSONL (prompt/completion)")
    parser.add_argument("--eval", type=Path, default=DEFAULT_DATA / "eval.jsonl",
                        help="evaluation JSONL (prompt/completion)")
    parser.add_argument("--coupling", choices=["revffn", "revnet", "none"], default="revffn",
                        help="reversible coupling; none: the original model")
    parser.add_argument("--two-stage", action="store_true",
                        help="warm up the new adapters alone, then train everything")
    parser.add_argument("--warmup-steps", type=int, default=50, help="two-stage warm-up length")
    parser.add_argument("--warmup-lr", type=float, default=None, help="two-stage warm-up lr")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the revffn adapters by least squares on the first 512 "
                             "training examples before training (rf.calibrate)")
    parser.add_argument("--max-steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step")
    parser.add_argument("--eval-steps", type=int, default=50, help="evaluate every N steps")
    parser.add_argument("--eval-limit", type=int, default=None, help="eval rows used")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="Trainer output directory (checkpoints, metrics)")
    parser.add_argument("--no-save", action="store_true", help="do not save the final model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is much faster than 2 on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order and init")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)

    tok = AutoTokenizer.from_pretrained(args.model)
    model = load_for_finetune(args.model, args.coupling)
    train_rows, eval_rows = read_jsonl(args.train), read_jsonl(args.eval)
    if args.calibrate:
        if getattr(model, "coupling", None) != "revffn":
            parser.error("--calibrate needs the revffn coupling")
        print(calibrate_on_rows(model, tok, train_rows[:512]))
    if args.eval_limit:
        eval_rows = eval_rows[:args.eval_limit]
    targs = training_args(args.output_dir, args.max_steps, args.lr, args.batch_size,
                          args.eval_steps, args.seed)
    cb = (TwoStageCallback(warmup_steps=args.warmup_steps, warmup_lr=args.warmup_lr)
          if args.two_stage else None)
    t0 = time.time()
    trainer, history = finetune(model, tok, train_rows, eval_rows, targs, cb)
    train_s = time.time() - t0
    eval_loss = trainer.evaluate()["eval_loss"]
    em = exact_match(model, tok, eval_rows)
    result = {"coupling": args.coupling, "two_stage": args.two_stage, "steps": args.max_steps,
              "eval_loss": eval_loss, "exact_match": em, "train_seconds": round(train_s, 1),
              "history": history.records}
    print(f"final eval loss {eval_loss:.4f}, exact match {em:.1f}% "
          f"({len(eval_rows)} problems), {train_s:.0f}s")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_save:
        final = args.output_dir / "final"
        model.save_pretrained(final)
        tok.save_pretrained(final)
        print(f"saved to {final}")
    return result


if __name__ == "__main__":
    main()
