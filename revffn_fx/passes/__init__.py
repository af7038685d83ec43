"""The built-in passes, one module each, in pipeline order.

- ``analyze``: find residual sublayers and decide convertibility (-> Plan)
- ``couple``: rewrite a layer graph into a reversible coupling graph
- ``chunk_tokens``: call the token-wise modules (MoE, MLP) a chunk of tokens at a time
- ``inverse``: read a coupling's updates off its data flow, emit its inverse
- ``cross_branch``: split an attention's query path from its key/value path (cross-branch
  attention for the revffn coupling; its inverse becomes a fixed point)
- ``fuse``: fuse runs of reversible layers into reversible-stack nodes
- ``loss_head``: replace lm_head + logit transform + cross-entropy by a chunked head
- ``manager``: the PassManager that runs passes with lint and snapshots
- ``pipeline``: the built-in passes as torch.fx passes, ``(GraphModule) -> PassResult``
  with their parameters in the constructor, and the coupling invariant

The compiler, as :data:`PIPELINE` lists it: per converted layer ``Couple`` -> the user's
passes (``rf.transform(..., passes=[...])``) -> ``ChunkTokens`` -> ``generate_inverse``;
per model graph ``Fuse`` -> ``CheckpointRest`` -> ``ChunkLossHead`` -> ``CutAtHead``. Build
a list with :func:`layer_pipeline` / :func:`model_pipeline`, insert your own pass anywhere
in it, and run it with :class:`PassManager` (``invariant=coupling_problem`` on layer graphs).
"""

from .analyze import analyze, analyze_layer
from .couple import couple_layer, make_adapters
from .cross_branch import cross_attentions
from .fuse import fuse_stacks
from .inverse import generate_inverse
from .loss_head import chunk_loss_head
from .manager import PassManager, PassRecord
from .pipeline import (
    CheckpointRest,
    ChunkLossHead,
    ChunkTokens,
    Couple,
    CutAtHead,
    Fuse,
    coupling_problem,
    layer_pipeline,
    model_pipeline,
)

#: the graph-to-graph passes in pipeline order: (scope, pass class)
PIPELINE = (("layer", Couple), ("layer", ChunkTokens), ("model", Fuse), ("model", CheckpointRest),
            ("model", ChunkLossHead), ("model", CutAtHead))
#: every built-in step by name: the front end (analyze), the passes, the inverse generator
BUILTIN = {
    "analyze": analyze_layer,
    "couple": Couple,
    "cross_branch": cross_attentions,
    "chunk_tokens": ChunkTokens,
    "inverse": generate_inverse,
    "fuse": Fuse,
    "checkpoint_rest": CheckpointRest,
    "chunk_head": ChunkLossHead,
    "cut_at_head": CutAtHead,
}

__all__ = ["BUILTIN", "PIPELINE", "CheckpointRest", "ChunkLossHead", "ChunkTokens",
           "Couple", "CutAtHead",
           "Fuse", "PassManager", "PassRecord", "analyze", "analyze_layer", "chunk_loss_head",
           "couple_layer", "coupling_problem", "cross_attentions", "fuse_stacks",
           "generate_inverse", "layer_pipeline", "make_adapters", "model_pipeline"]
