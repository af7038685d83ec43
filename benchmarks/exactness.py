"""The exactness table: gradient error of the generated backward against float64 of the
same coupled function, next to plain autograd's in the training dtype, per coupling x
weight dtype x depth (docs/quality.md, "Exactness").

    python benchmarks/exactness.py --json benchmarks/exactness.json
    python benchmarks/exactness.py --couplings momentum --dtypes bfloat16 --depths 24

Models: ``tiny-moe-stdlib`` (the shipped pretrained example, 4 layers) and Mixtral-shaped
random models (hidden 64, 4 experts top-2) at each ``--depths``. Options are the defaults
of ``rf.transform`` unless ``--option key=value`` is given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import revffn_fx as rf
from revffn_fx.checks.exactness import exactness
from revffn_fx.options import COUPLINGS

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def model_for(name: str, dtype: torch.dtype):
    if name == "stdlib":
        m = rf.load_model(ROOT / "examples" / "tiny-moe-stdlib", dtype=dtype)
        return m, int(m.config.vocab_size)
    from transformers import AutoModelForCausalLM, MixtralConfig

    layers = int(name)
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                        max_position_embeddings=128, tie_word_embeddings=False,
                        num_local_experts=4, num_experts_per_tok=2, head_dim=16)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype), 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--couplings", default=",".join(COUPLINGS),
                    help="comma list (default: every coupling of the registry)")
    ap.add_argument("--dtypes", default="bfloat16,float32",
                    help="weight dtypes, comma list (default: bfloat16,float32)")
    ap.add_argument("--depths", default="stdlib,4,24",
                    help="'stdlib' and/or layer counts (default: stdlib,4,24)")
    ap.add_argument("--seq", type=int, default=48,
                    help="tokens per sequence, batch 2 (default: 48)")
    ap.add_argument("--option", action="append", default=[],
                    help="a transform option key=value, repeatable (default: none)")
    ap.add_argument("--json", type=Path, help="write the rows here (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    opts = {}
    for kv in args.option:
        k, _, v = kv.partition("=")
        opts[k] = json.loads(v) if v[:1] in "0123456789tfn[{\"" else v
    rows = []
    for depth in args.depths.split(","):
        for dt in args.dtypes.split(","):
            for c in args.couplings.split(","):
                model, vocab = model_for(depth, DTYPES[dt])
                ids = torch.randint(2, vocab, (2, args.seq),
                                    generator=torch.Generator().manual_seed(1))
                t = time.time()
                try:
                    rev = rf.transform(model, coupling=c, **opts).train()
                    e = exactness(rev, ids)
                    row = dict(model=depth, dtype=dt, coupling=c, gen=e.gen, auto=e.auto,
                               tol=e.tol, ok=e.ok, worst=e.worst)
                except rf.RevFFNError as err:
                    row = dict(model=depth, dtype=dt, coupling=c, refused=str(err))
                row["seconds"] = round(time.time() - t, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"argv": sys.argv[1:], "options": opts,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
