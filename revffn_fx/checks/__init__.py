"""Checks of a transformed model: the generated backward against autograd, the rewrite
against the original layers (rf.verify)."""
