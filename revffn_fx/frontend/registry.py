"""Per-architecture knowledge, in one place.

revffn-fx finds decoder layers, residual branches and their kinds from the graph and the
module structure. A few facts cannot be read off the structure; they live here, keyed by
the Hugging Face ``model_type``. Every entry has a test in ``tests/test_registry.py``.
Hand-written models need no entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# transformers versions these facts were read off and tested with.
SUPPORTED_TRANSFORMERS = (">=5.20", "<5.40")


@dataclass(frozen=True)
class ArchFacts:
    """What the generic analysis cannot infer for one architecture."""

    # Sublayer kinds that structure cannot settle: {module attribute name: kind}.
    kind_overrides: dict[str, str] = field(default_factory=dict)
    # Keyword arguments the model must be built with for tracing/training to work.
    load_kwargs: dict[str, object] = field(default_factory=dict)
    # Free text shown by `revffn inspect`.
    note: str = ""


REGISTRY: dict[str, ArchFacts] = {
    # gpt_oss refuses sdpa attention (it has attention sinks).
    "gpt_oss": ArchFacts(load_kwargs={"attn_implementation": "eager"},
                         note="eager attention (sinks)"),
}


def facts_for(model_type: str | None) -> ArchFacts:
    """The registry entry for ``model_type``; an empty entry when there is none."""
    return REGISTRY.get(model_type or "", ArchFacts())
