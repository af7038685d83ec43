"""meft (after MEFT): two full-width copies; sublayer k overwrites one from the other,
``W <- g W + (1-g) R + f(R)``; the hidden state is the stream written last."""

from .base import Coupling, power_of_two_fraction
from .momentum import DEFAULT_MOMENTUM

COUPLING = Coupling(
    name="meft", summary="two copies, each sublayer keeps g of the stream it overwrites",
    split="copies_last", rewrite="revffn_fx.passes.couple_momentum:couple_scaled_layer",
    update="scaled", scaled_per_sublayer=1,
    options={"momentum": (DEFAULT_MOMENTUM, power_of_two_fraction("momentum"))})
