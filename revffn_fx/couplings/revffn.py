"""revffn (the paper's block): halves of the hidden state, projection adapters d/2 <-> d
around each pretrained branch, additive updates; optional cross-branch attention."""

from .base import Coupling

COUPLING = Coupling(
    name="revffn", summary="halves of the hidden state with adapters (the RevFFN paper)",
    split="halves", rewrite="revffn_fx.passes.couple:couple_layer",
    adapter_params=2, stream_width=1, cross_attention=True)
