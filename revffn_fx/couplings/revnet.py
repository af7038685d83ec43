"""revnet: two full-width copies of the hidden state, merged by their mean (Reformer,
RevViT); no new parameters, additive updates."""

from .base import Coupling

COUPLING = Coupling(
    name="revnet", summary="two full-width copies, merged by their mean (no new parameters)",
    split="copies", rewrite="revffn_fx.passes.couple:couple_layer")
