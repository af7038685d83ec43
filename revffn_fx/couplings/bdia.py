"""bdia (Zhang, Kleijn et al. 2024, arXiv 2407.09093): each decoder layer after the first
of a stack trains as ``x_{k+1} = gamma x_{k-1} + (1-gamma) x_k + (1+gamma) h_k(x_k)``
with ``h_k(x) = layer(x) - x`` and ``gamma = +-bdia_gamma`` drawn per sample and layer;
evaluated with gamma = 0, which is the original layer: the trained weights are the
original architecture's. On the exact-streams grid the division by gamma is undone with
log2(1/gamma) stored bits per element per layer."""

from .base import Coupling, power_of_two_fraction

GAMMAS = (0.5, 0.25, 0.125, 0.0625)
# gamma 1/16 (4 stored bits): within 0.3% of full fine-tuning at 300 steps, where 1/8 is 1%
# behind and 1/2 8% (docs/quality.md, domain shift)
DEFAULT_GAMMA = 0.0625

COUPLING = Coupling(
    name="bdia", summary="the original layers trained with +-gamma of the layer before "
                         "(evaluates as the original architecture)",
    split="bdia", rewrite="revffn_fx.passes.couple_bdia:couple_bdia_layer",
    update="sampled", preserves_function=True, scaled_per_layer=1, whole_layer=True,
    options={"bdia_gamma": (DEFAULT_GAMMA, power_of_two_fraction("bdia_gamma", GAMMAS))})
