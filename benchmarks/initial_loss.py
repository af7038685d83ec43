"""Held-out loss of the pretrained example model before and after the transform, before
any fine-tuning, for each coupling and revffn adapter initialisation (calibrated: rf.calibrate
on 4096 tokens of the training files), and for the momentum and meft couplings at several
momentum values g.

    python benchmarks/initial_loss.py
    python benchmarks/initial_loss.py --only momentum,meft --momentum 0.5,0.25,0.125,0.0625
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoTokenizer

import revffn_fx as rf

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "tiny-moe-stdlib"


def _pretrain_module():  # examples/ is not a package
    spec = importlib.util.spec_from_file_location("pretrain", ROOT / "examples" /
                                                  "pretrain_tiny_moe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--only", default="revffn,revnet,momentum,meft",
                        help="comma-separated couplings to measure")
    parser.add_argument("--momentum", default="0.5,0.25,0.125,0.0625,0.00390625",
                        help="comma-separated g values for the momentum and meft couplings")
    args = parser.parse_args()
    only = set(args.only.split(","))
    torch.set_num_threads(1)
    pre = _pretrain_module()
    tok = AutoTokenizer.from_pretrained(MODEL)
    train, held_out = pre.split_files(pre.stdlib_files())
    ids = pre.encode(tok, pre.read_texts(held_out, 2_000_000))
    # calibration text: training files (never the held-out ones), 32 windows of 128 tokens
    cal = pre.encode(tok, pre.read_texts(train[::40], 400_000))[:32 * 128].view(32, 128)
    model = rf.load_model(MODEL, experts_implementation="eager")
    print(f"original: {pre.eval_loss(model, ids, seq=128):.4f}", flush=True)
    ref = pre.eval_loss(model, ids, seq=128)
    for coupling in ("momentum", "meft"):
        if coupling not in only:
            continue
        for g in (float(v) for v in args.momentum.split(",")):
            rev = rf.transform(model, coupling=coupling, momentum=g, stream_dtype="float64")
            loss = pre.eval_loss(rev, ids, seq=128)
            print(f"{coupling}, g = {g:g}: {loss:.4f} ({100 * (loss / ref - 1):+.2f}%)",
                  flush=True)
    for coupling, init in (("revffn", "[I; 0] (default)"), ("revffn", "[I; I]"),
                           ("revffn", "aligned"), ("revffn", "calibrated"), ("revnet", "-")):
        if coupling not in only:
            continue
        rev = rf.transform(model, coupling=coupling)
        with torch.no_grad():
            for mods in rev.adapters.values():
                for key in ("F_up", "G_up"):
                    half = mods[key].weight.shape[1]
                    if init == "[I; I]":
                        mods[key].weight[half:].copy_(torch.eye(half))
                    if init == "aligned" and key == "F_up":  # X2 at its own positions
                        mods[key].weight.zero_()
                        mods[key].weight[half:].copy_(torch.eye(half))
        if init == "calibrated":
            print(f"  {rf.calibrate(rev, cal.split(8)).summary()}")
        print(f"{coupling}, up-adapters {init}: {pre.eval_loss(rev, ids, seq=128):.3f}")


if __name__ == "__main__":
    main()
