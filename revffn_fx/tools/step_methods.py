"""The methods ``revffn bench --step`` measures (:data:`STEP_METHODS`): for each, which
model, checkpointing, loss head and optimizer; a full stack for every coupling of the
registry; the default and long-context selections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from revffn_fx.options import COUPLINGS, SCALED_COUPLINGS


@dataclass(frozen=True)
class StepMethod:
    """How one method trains: which model, checkpointing, loss head and optimizer."""

    label: str
    coupling: str | None  # None: the original model; "none": the exact mode
    checkpoint: bool  # transformers' activation checkpointing (original model only)
    head: str  # "original" or "chunked"
    fused: bool  # AdamW fused into the backward
    transform: tuple[tuple[str, Any], ...] = ()  # more keywords of rf.transform
    offload: str | None = None  # "pinned" / "unpinned": save_on_cpu around forward and loss


STEP_METHODS: dict[str, StepMethod] = {
    "sft": StepMethod("SFT, no checkpointing", None, False, "original", False),
    "ckpt": StepMethod("SFT + HF checkpointing (baseline)", None, True, "original", False),
    "ckpt+fused": StepMethod("HF checkpointing + fused AdamW", None, True, "original", True),
    "exact": StepMethod("exact mode: checkpointing + lean head + fused AdamW", "none", True,
                        "chunked", True),
    "exact/no-fusion": StepMethod("exact mode, AdamW not fused", "none", True, "chunked",
                                  False),
    "revffn": StepMethod("revffn + lean head + fused AdamW", "revffn", False, "chunked", True),
    "revffn/no-head": StepMethod("revffn, original head", "revffn", False, "original", True),
    "revffn/no-fusion": StepMethod("revffn, AdamW not fused", "revffn", False, "chunked",
                                   False),
    "revnet": StepMethod("revnet + lean head + fused AdamW", "revnet", False, "chunked", True),
    "revnet/no-head": StepMethod("revnet, original head", "revnet", False, "original", True),
    "revnet/no-fusion": StepMethod("revnet, AdamW not fused", "revnet", False, "chunked",
                                   False),
    "offload": StepMethod("exact mode, saved tensors offloaded to pinned CPU memory", "none",
                          True, "chunked", True, offload="pinned"),
    "offload/unpinned": StepMethod("exact mode, saved tensors offloaded (not pinned)", "none",
                                   True, "chunked", True, offload="unpinned"),
}


def _add_couplings() -> None:
    """A full-stack method for every coupling of options.COUPLINGS not listed above (one
    place: a coupling added there is measured here); the scaled ones with exact streams."""
    for c in COUPLINGS:
        if c == "none" or c in STEP_METHODS:
            continue
        exact = c in SCALED_COUPLINGS
        STEP_METHODS[c] = StepMethod(
            f"{c}{' (exact streams)' if exact else ''} + lean head + fused AdamW", c, False,
            "chunked", True, (("exact_streams", True),) if exact else ())


_add_couplings()
# the token chunk's effect at long context: bdia recomputes attention with the MoE chunks
for _c in ("revnet", "bdia"):
    STEP_METHODS[f"{_c}/chunk1024"] = StepMethod(
        f"{_c}, MoE run 1024 tokens at a time", _c, False, "chunked", True,
        (*STEP_METHODS[_c].transform, ("token_chunk", 1024)))
    STEP_METHODS[f"{_c}/no-chunks"] = StepMethod(
        f"{_c}, MoE run on all tokens at once", _c, False, "chunked", True,
        (*STEP_METHODS[_c].transform, ("token_chunk", 0)))
# exact streams in 4 bytes (int32 units, runtime/grid.py) over these fp32 benchmark models,
# whose default grid is float64 (8 bytes): what 16-bit models get by default
for _c in ("revnet", "momentum", "bdia"):
    STEP_METHODS[f"{_c}/int32"] = StepMethod(
        f"{_c}, exact streams as int32 units", _c, False, "chunked", True,
        (("stream_dtype", "int32"),))
STEP_METHODS["bdia/int32+chunk1024"] = StepMethod(
    "bdia, int32 exact streams, MoE run 1024 tokens at a time", "bdia", False, "chunked",
    True, (("stream_dtype", "int32"), ("token_chunk", 1024)))
#: the methods of a long-context comparison: the exact mode, its offloading peer and every
#: coupling's full stack
LONG_METHODS = ("exact", "offload", *(m for m in STEP_METHODS
                                      if STEP_METHODS[m].coupling not in (None, "none")
                                      and "/" not in m))
DEFAULT_STEP_METHODS = ("sft", "ckpt", "exact", "revffn", "revnet", "revffn/no-head",
                        "revffn/no-fusion")
