"""Generate the arithmetic word-problem task in ``examples/data/`` (fixed seed).

Each JSONL line is ``{"prompt": "Q: Tom has 3 apples and buys 4 more. How many apples
does Tom have now?\\nA:", "completion": " 7"}``: one addition or subtraction of numbers
below ``MAX_N``, answer a non-negative integer, so exact match is meaningful. Train and
eval problems are disjoint (by prompt):

    python examples/make_task_data.py            # writes train.jsonl and eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 0
MAX_N = 20
OUT_DIR = Path(__file__).resolve().parent / "data"
NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Lia", "Max", "Zoe", "Ian", "Amy", "Leo", "Mia"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "cups", "stamps", "eggs",
         "rocks", "keys", "hats"]
ADD = ["{n} has {a} {i} and buys {b} more.", "{n} has {a} {i} and finds {b} more.",
       "{n} had {a} {i}. A friend gave {n} {b} more."]
SUB = ["{n} has {a} {i} and gives away {b}.", "{n} had {a} {i} and lost {b} of them.",
       "{n} has {a} {i} and sells {b}."]
QUESTION = " How many {i} does {n} have now?\nA:"


def problem(rng: random.Random) -> dict[str, str]:
    """One random problem as ``{"prompt", "completion"}``."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(0, MAX_N), rng.randint(0, MAX_N)
    if rng.random() < 0.5:
        story, answer = rng.choice(ADD), a + b
    else:
        a, b = max(a, b), min(a, b)
        story, answer = rng.choice(SUB), a - b
    prompt = "Q: " + story.format(n=name, a=a, b=b, i=item) + QUESTION.format(n=name, i=item)
    return {"prompt": prompt, "completion": f" {answer}"}


def generate(n_train: int, n_eval: int, seed: int = SEED) -> tuple[list[dict[str, str]],
                                                                   list[dict[str, str]]]:
    """Disjoint train and eval lists (eval drawn first, train skips its prompts)."""
    rng = random.Random(seed)
    evals: dict[str, dict[str, str]] = {}
    while len(evals) < n_eval:
        p = problem(rng)
        evals.setdefault(p["prompt"], p)
    train: list[dict[str, str]] = []
    while len(train) < n_train:
        p = problem(rng)
        if p["prompt"] not in evals:
            train.append(p)
    return train, list(evals.values())


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where train.jsonl and eval.jsonl are written (the default "
                             "regenerates the shipped files, identical for the same counts)")
    parser.add_argument("--train", type=int, default=4000, help="training problems")
    parser.add_argument("--eval", type=int, default=400, help="evaluation problems")
    args = parser.parse_args()
    train, evals = generate(args.train, args.eval)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", evals)
    print(f"wrote {len(train)} train / {len(evals)} eval problems to {args.out_dir}")


if __name__ == "__main__":
    main()
