"""Per-token time of ``rev.generate`` (cached) against the original model's cached generate,
in the same process, alternating the runs (``--repeats`` rounds; the fastest round of each
method is reported, and the medians beside it).

    python benchmarks/generation.py --new-tokens 200 --json benchmarks/generation.json

Mixtral-shaped random model built from a config (hidden 512, 4 layers, 8 experts top-2,
vocab 32000), fp32, batch 1, greedy. Per-token time: (time of N new tokens - time of 1) /
(N - 1), so the prompt's prefill is left out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import revffn_fx as rf


def _time(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(n)
    dt = time.perf_counter() - t
    assert out.shape[1] >= n, out.shape
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=200,
                    help="tokens generated per run (default: 200)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default: 32)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed rounds per method (default: 3)")
    ap.add_argument("--couplings", default="none,revffn,revnet,momentum",
                    help="comma list (default: none,revffn,revnet,momentum)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--json", help="write the results here (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                        num_hidden_layers=args.layers, num_attention_heads=8,
                        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, 32000, (1, args.prompt))
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    models = {"original": base}
    for c in args.couplings.split(","):
        models[c] = rf.transform(copy.deepcopy(base), coupling=c).eval()
    times: dict[str, list[float]] = {k: [] for k in models}
    n = args.new_tokens
    with torch.no_grad():
        for m in models.values():  # warm-up (compiles the RevModels' eval graphs)
            m.generate(ids, max_new_tokens=2, **kw)
        for _ in range(args.repeats):
            for name, m in models.items():
                def run(k: int, m=m) -> torch.Tensor:  # type: ignore[no-untyped-def]
                    return m.generate(ids, max_new_tokens=k, min_new_tokens=k, **kw)
                one = _time(run, 1)
                full = _time(run, n)
                times[name].append((full - one) / (n - 1))
    # the fastest round of each: on a shared machine the others measure the neighbours
    ref, ref_med = min(times["original"]), statistics.median(times["original"])
    rows = {k: {"ms_per_token": 1e3 * min(v), "ms_per_token_median": 1e3 * statistics.median(v),
                "ms_per_token_all": [1e3 * x for x in v], "ratio": min(v) / ref,
                "ratio_median": statistics.median(v) / ref_med} for k, v in times.items()}
    for k, r in rows.items():
        print(f"{k:10s} {r['ms_per_token']:7.2f} ms/token (fastest of {args.repeats})  "
              f"{r['ratio']:.2f}x  (medians: {r['ratio_median']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
