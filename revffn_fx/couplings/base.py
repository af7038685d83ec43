"""What a coupling declares: the one interface every part of revffn-fx reads.

A coupling is one module in this package exporting ``COUPLING``, a :class:`Coupling`. It
says, without importing torch (the command line reads it before the heavy imports):

- its name, a one-line summary and its own options (with their validation);
- its rewrite pass (``rewrite``: "module:function", resolved by :meth:`Coupling.rewrite_pass`
  when a layer is compiled) and how it splits the hidden state into streams;
- its update rule: additive, scaled by a fraction g (its inverse divides by g: exact
  streams by default, with the bits the division drops stored), or sampled per sample
  (bdia's +-gamma);
- its memory model (streams, stored bits, added parameters), used by ``revffn plan`` and
  the estimator;
- whether its trained model is the original architecture (``rev.to_original()`` and the
  plain export).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from ..errors import ConversionError


@dataclass(frozen=True)
class Coupling:
    """One coupling's declaration (see the module docstring)."""

    name: str
    summary: str
    #: stream split of the runtime (revffn_fx.runtime.streams.SPLITS); None: no stack at
    #: all (the exact mode)
    split: str | None
    #: "module:function" of its rewrite pass over one layer graph (None: no rewrite)
    rewrite: str | None = None
    #: "additive" (x_t += f), "scaled" (x_t = g x_t + f: inverse divides by g) or "sampled"
    #: (bdia: x_t = +-gamma x_t + f, the sign drawn per sample)
    update: str = "additive"
    #: whether the trained weights are the original architecture's (to_original, export)
    preserves_function: bool = False
    #: parameters it adds per converted layer, in hidden_size**2 (revffn's adapters)
    adapter_params: int = 0
    #: width of its streams together, in hidden sizes (revffn: two halves = 1)
    stream_width: int = 2
    #: how many of its updates are scaled (store bits with exact streams): per residual
    #: sublayer (momentum, meft) and per layer (bdia)
    scaled_per_sublayer: int = 0
    scaled_per_layer: int = 0
    #: it can take its queries from the other stream (attention="cross")
    cross_attention: bool = False
    #: the whole decoder layer is one update (bdia), not one update per residual sublayer
    whole_layer: bool = False
    #: option name -> (default, check): its own options of TransformOptions
    options: Mapping[str, tuple[Any, Callable[[Any], Any]]] = field(default_factory=dict)

    @property
    def scaled(self) -> bool:
        """Its inverse divides (by g or gamma): exact streams are its default."""
        return self.update in ("scaled", "sampled")

    @property
    def converts(self) -> bool:
        """It rewrites layers into reversible stacks (all but the exact mode)."""
        return self.split is not None

    def rewrite_pass(self) -> Callable[..., Any]:
        """The rewrite function (imports the pass module: torch and torch.fx)."""
        if self.rewrite is None:
            raise ConversionError(f"the {self.name} coupling rewrites no layer")
        module, _, name = self.rewrite.partition(":")
        return getattr(import_module(module), name)

    def scale(self, options: Mapping[str, Any]) -> float | None:
        """The fraction kept by a scaled update (momentum, or bdia's |gamma|)."""
        for key in ("momentum", "bdia_gamma"):
            if key in self.options:
                return float(options[key])
        return None

    def scaled_updates(self, sublayers: int) -> int:
        """Scaled updates in a layer of ``sublayers`` residual sublayers."""
        return self.scaled_per_sublayer * sublayers + self.scaled_per_layer

    def side_bits(self, options: Mapping[str, Any]) -> int:
        """Bits per element a scaled update drops and stores with exact streams: log2(1/g)."""
        g = self.scale(options)
        return 0 if g is None else round(-math.log2(g))


def power_of_two_fraction(name: str, choices: tuple[float, ...] | None = None
                          ) -> Callable[[Any], float]:
    """A check of an option that must be a number in (0, 1) (and one of ``choices``)."""

    def check(value: Any) -> float:
        try:
            g = float(value)
        except (TypeError, ValueError):
            raise ConversionError(f"{name} must be a number in (0, 1), got {value!r}") from None
        if not 0.0 < g < 1.0:
            raise ConversionError(f"{name} must be in (0, 1) (the fraction of the stream kept "
                                  f"by each update; 0 is not invertible), got {g}")
        if choices is not None and g not in choices:
            raise ConversionError(f"{name} must be one of "
                                  f"{', '.join(f'{c:g}' for c in choices)}, got {g:g}")
        return g

    return check
