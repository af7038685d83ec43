"""momentum (Momentum ResNets): streams (X, V), per residual sublayer
``V <- g V + (1-g) f(X); X <- X + V``; keeps the pretrained function to within g."""

from .base import Coupling, power_of_two_fraction

DEFAULT_MOMENTUM = 0.125  # g = 1/8: step-0 loss within 0.1% (docs/quality.md), 3 bits

COUPLING = Coupling(
    name="momentum", summary="position and velocity streams; keeps the pretrained function",
    split="momentum", rewrite="revffn_fx.passes.couple_momentum:couple_scaled_layer",
    update="scaled", scaled_per_sublayer=1,
    options={"momentum": (DEFAULT_MOMENTUM, power_of_two_fraction("momentum"))})
