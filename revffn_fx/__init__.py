"""revffn-fx: rewrite the decoder layers of MoE causal LMs into reversible couplings.

The pipeline, one direction: trace -> analyze -> rewrite -> generate backward -> export.

    import revffn_fx as rf
    rev = rf.transform("path/to/model_dir")          # RevModel
    report = rf.verify(rev, input_ids)                 # generated backward vs autograd

Names are imported on first use (PEP 562), so ``revffn --help`` does not pay for torch and
transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_WHERE = {
    "ConversionError": ".errors", "ExportError": ".errors", "FixedPointError": ".errors",
    "LoadError": ".errors", "RevFFNError": ".errors", "TraceError": ".errors",
    "ReconstructionError": ".errors",
    "GraphDiff": ".diffs", "diff": ".diffs",
    "TransformSummary": ".export", "load": ".export", "transform_dir": ".export",
    "LayerGraph": ".frontend.ir", "TracedModel": ".frontend.ir", "trace": ".frontend.ir",
    "load_model": ".frontend.loading",
    "CalibrationReport": ".calibration", "calibrate": ".calibration",
    "RevModel": ".model", "transform": ".model",
    "analyze": ".passes.analyze",
    "PassManager": ".passes.manager", "PassRecord": ".passes.manager",
    "LayerPlan": ".frontend.plan", "Plan": ".frontend.plan", "Sublayer": ".frontend.plan",
    "VerifyReport": ".checks.verification", "verify": ".checks.verification",
}

__all__ = [
    "CalibrationReport", "ConversionError", "ExportError", "FixedPointError", "GraphDiff",
    "LayerGraph", "LayerPlan", "LoadError", "PassManager", "PassRecord", "Plan",
    "ReconstructionError", "RevFFNError",
    "RevModel", "Sublayer", "TraceError", "TracedModel", "TransformSummary", "VerifyReport",
    "analyze", "calibrate", "diff", "load", "load_model", "passes", "trace", "transform",
    "transform_dir", "verify",
]


def __getattr__(name: str) -> Any:
    if name == "passes":
        return import_module(".passes", __name__)
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """Only the public names (not the helpers this module itself imports)."""
    return sorted(set(__all__) | {"__version__"})


if TYPE_CHECKING:  # for type checkers and IDEs
    from . import passes
    from .calibration import CalibrationReport, calibrate
    from .checks.verification import VerifyReport, verify
    from .diffs import GraphDiff, diff
    from .errors import (
        ConversionError,
        ExportError,
        FixedPointError,
        LoadError,
        ReconstructionError,
        RevFFNError,
        TraceError,
    )
    from .export import TransformSummary, load, transform_dir
    from .frontend.ir import LayerGraph, TracedModel, trace
    from .frontend.loading import load_model
    from .frontend.plan import LayerPlan, Plan, Sublayer
    from .model import RevModel, transform
    from .passes.analyze import analyze
    from .passes.manager import PassManager, PassRecord
