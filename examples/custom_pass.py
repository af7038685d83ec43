"""A user pass over the coupling IR: swap RMSNorm modules for torch's fused ``F.rms_norm``.

Run it on the shipped tiny model:

    python examples/custom_pass.py                      # prints the pass's diff
    python examples/custom_pass.py --html /tmp/pass.html

The pass receives each layer's coupling GraphModule (after the built-in ``couple_*`` pass)
and replaces every ``call_module`` to an RMSNorm by ``F.rms_norm(x, shape, weight, eps)``,
reading the weight with a ``get_attr`` so that the model's own parameter is used (and
trained). Each new node keeps the old node's meta and records where it came from in
``meta["from_node"]``, so the diff lists the norms as *changed*, not as removed + added.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import revffn_fx as rf
from revffn_fx.diffs import diff

MODEL_DIR = Path(__file__).resolve().parent / "tiny-mixtral"


def _is_plain_rms_norm(mod: torch.nn.Module) -> float | None:
    """The eps of a norm computing ``weight * x / rms(x)`` (checked on a probe), else None."""
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", None))
    weight = getattr(mod, "weight", None)
    if "RMSNorm" not in type(mod).__name__ or eps is None or weight is None or weight.ndim != 1:
        return None
    x = torch.randn(2, 3, weight.shape[0], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        same = torch.allclose(mod(x), F.rms_norm(x, weight.shape, weight, eps), atol=1e-5)
    return float(eps) if same else None


class FuseRMSNorm(PassBase):
    """Replace RMSNorm module calls by ``F.rms_norm`` (one fused kernel on GPU)."""

    name = "fuse_rms_norm"

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            eps = _is_plain_rms_norm(mod)
            if eps is None:
                continue
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(f"{node.target}.weight")
                weight.meta["revffn"] = "fused_norm_weight"  # a tag of our own: a new node
                fused = gm.graph.call_function(
                    F.rms_norm, (node.args[0], tuple(mod.weight.shape), weight, eps))
            # provenance: keep the meta, and name the node this one stands for
            fused.meta.update(node.meta)
            fused.meta["from_node"] = node.meta.get("from_node", node.name)
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            modified = True
        return PassResult(gm, modified)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=str(MODEL_DIR),
                        help="local model directory to transform")
    parser.add_argument("--html", help="also write the diff as one HTML page here")
    args = parser.parse_args(argv)

    model = rf.load_model(args.model_dir)
    rev = rf.transform(model, passes=[FuseRMSNorm()])
    plain = rf.transform(model)
    rev.specs()  # compile the layer couplings: this runs the passes

    # our pass, on the first layer (the built-in chunk_tokens runs after the user's passes)
    record = next(r for r in rev.pass_records[f"layer{rev.converted[0]}"]
                  if r.name == "fuse_rms_norm")
    d = diff(record.before, record.after, titles=("coupling graph", f"after {record.name}"))
    print(d.to_text(context=1))

    ids = torch.arange(16).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        err = (rev.eval()(ids).logits - plain.eval()(ids).logits).abs().max().item()
    print(f"\nmax |logits difference| with and without the pass: {err:.2e}")
    if args.html:
        Path(args.html).write_text(d.to_html(), encoding="utf-8")
        print(f"wrote {args.html}")
    return {"diff": d, "max_err": err}


if __name__ == "__main__":
    main()
