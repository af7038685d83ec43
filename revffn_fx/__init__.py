"""revffn-fx: rewrite the decoder layers of MoE causal LMs into reversible couplings.

The pipeline, one direction: trace -> analyze -> rewrite -> generate backward -> export.

    import revffn_fx as rf
    rev = rf.transform("path/to/model_dir")          # RevModel
    report = rf.verify(rev, input_ids)                 # generated backward vs autograd
"""

from . import passes
from .diff import GraphDiff, diff
from .errors import (
    ConversionError,
    ExportError,
    FixedPointError,
    LoadError,
    RevFFNError,
    TraceError,
)
from .export import TransformSummary, load, transform_dir
from .ir import LayerGraph, TracedModel, trace
from .loading import load_model
from .model import RevModel, transform
from .passes.analyze import analyze
from .passes.manager import PassManager, PassRecord
from .plan import LayerPlan, Plan, Sublayer
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "ConversionError", "ExportError", "FixedPointError", "GraphDiff", "LayerGraph", "LayerPlan",
    "LoadError", "PassManager", "PassRecord", "Plan", "RevFFNError", "RevModel", "Sublayer",
    "TraceError", "TracedModel", "TransformSummary", "VerifyReport", "analyze", "diff", "load",
    "load_model", "passes", "trace", "transform", "transform_dir", "verify",
]
