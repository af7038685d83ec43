"""The analysis result: what every decoder layer is made of and whether it can be coupled."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(repr=False)
class Sublayer:
    """One residual branch of a decoder layer: ``out = residual + scale * branch(residual)``.

    ``residual_form``: "pre_norm" (norm at the branch input), "post_norm" (norm on the
    branch output), "sandwich" (both), "scaled" (a constant multiplies the branch),
    "plain" (no norm), or, in a layer that is not of the form x + f(x), "norm_residual"
    (the residual is taken after a norm and both sides are scaled), "gated", "affine" or
    "hyper_connection" (the stream multiplied by a gate, by learned weights, mixed with
    other streams by a learned matrix).
    """

    kind: str
    residual_form: str
    scale: float | None = None
    norm_before: str | None = None
    norm_after: str | None = None
    modules: list[str] = field(default_factory=list)
    module_kinds: dict[str, str] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    residual_node: str = ""
    add_node: str = ""

    def __repr__(self) -> str:
        """``Sublayer(moe, pre_norm: post_attention_layernorm, mlp)``."""
        scale = f" x{self.scale:g}" if self.scale is not None else ""
        return f"Sublayer({self.kind}, {self.residual_form}{scale}: " \
               f"{', '.join(self.modules) or '-'})"


@dataclass(repr=False)
class LayerPlan:
    """The sublayers of one decoder layer and whether it can become a coupling."""

    index: int
    qualname: str
    sublayers: list[Sublayer]
    convertible: bool
    reason: str = ""
    # how the residual updates are split across the two streams (see analyze.describe_pairing)
    pairing: str = ""

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.sublayers]

    def describe(self) -> str:
        """One line: ``3 model.layers.3: attention (pre_norm), moe (pre_norm): convertible``."""
        subs = ", ".join(f"{s.kind} ({s.residual_form})" for s in self.sublayers) \
            or "no residual branch"
        verdict = "convertible" if self.convertible else f"not convertible: {self.reason}"
        return f"{self.index} {self.qualname}: {subs}: {verdict}"

    def __repr__(self) -> str:
        return f"LayerPlan({self.describe()})"


@dataclass(repr=False)
class Plan:
    """The analysis of a whole model: one LayerPlan per decoder layer, plus model facts."""

    layers: list[LayerPlan]
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def convertible(self) -> list[int]:
        return [lp.index for lp in self.layers if lp.convertible]

    def summary(self) -> str:
        """One line, e.g. ``24 layers: 24 convertible; attention 24, moe 23, mlp 1``."""
        counts: dict[str, int] = {}
        for lp in self.layers:
            for s in lp.sublayers:
                counts[s.kind] = counts.get(s.kind, 0) + 1
        kinds = ", ".join(f"{k} {counts[k]}" for k in ("attention", "mixer", "moe", "mlp", "other")
                          if k in counts)
        return (f"{len(self.layers)} layers: {len(self.convertible)} convertible"
                + (f"; {kinds}" if kinds else ""))

    def __repr__(self) -> str:
        name = self.model.get("model_type") or self.model.get("class") or "model"
        return f"Plan({name}, {self.summary()})"

    def __str__(self) -> str:
        """The summary and one line per layer (``to_dict()`` has everything)."""
        return "\n".join([repr(self)] + [f"  {lp.describe()}" for lp in self.layers])

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "summary": self.summary(),
                "layers": [asdict(lp) for lp in self.layers]}
