"""The built-in passes, one module each, in pipeline order.

- ``analyze``: find residual sublayers and decide convertibility (-> Plan)
- ``couple``: rewrite a layer graph into a reversible coupling graph
- ``inverse``: read a coupling's updates off its data flow, emit its inverse
- ``fuse``: fuse runs of reversible layers into reversible-stack nodes
- ``manager``: the PassManager that runs passes with lint and snapshots
"""

from .analyze import analyze, analyze_layer
from .couple import couple_layer, make_adapters
from .fuse import fuse_stacks
from .inverse import generate_inverse
from .manager import PassManager, PassRecord

BUILTIN = {
    "analyze": analyze_layer,
    "couple": couple_layer,
    "inverse": generate_inverse,
    "fuse": fuse_stacks,
}

__all__ = ["BUILTIN", "PassManager", "PassRecord", "analyze", "analyze_layer", "couple_layer",
           "fuse_stacks", "generate_inverse", "make_adapters"]
