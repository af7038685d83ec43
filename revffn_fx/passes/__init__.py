"""The built-in passes, one module each, in pipeline order.

- ``analyze``: find residual sublayers and decide convertibility (-> Plan)
- ``couple``: rewrite a layer graph into a reversible coupling graph
- ``inverse``: read a coupling's updates off its data flow, emit its inverse
- ``cross_branch``: split an attention's query path from its key/value path (cross-branch
  attention for the revffn coupling; its inverse becomes a fixed point)
- ``fuse``: fuse runs of reversible layers into reversible-stack nodes
- ``loss_head``: replace lm_head + logit transform + cross-entropy by a chunked head
- ``manager``: the PassManager that runs passes with lint and snapshots
"""

from .analyze import analyze, analyze_layer
from .couple import couple_layer, make_adapters
from .cross_branch import cross_attentions
from .fuse import fuse_stacks
from .inverse import generate_inverse
from .loss_head import chunk_loss_head
from .manager import PassManager, PassRecord

BUILTIN = {
    "analyze": analyze_layer,
    "couple": couple_layer,
    "cross_branch": cross_attentions,
    "inverse": generate_inverse,
    "fuse": fuse_stacks,
    "loss_head": chunk_loss_head,
}

__all__ = ["BUILTIN", "PassManager", "PassRecord", "analyze", "analyze_layer", "chunk_loss_head",
           "couple_layer", "cross_attentions", "fuse_stacks", "generate_inverse", "make_adapters"]
