"""What a module inside a residual branch is, from its structure and how it is called."""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..frontend.decoder_layers import is_norm

KINDS = ("attention", "mixer", "moe", "mlp", "norm", "other")

# projections that make a token mixer an attention (queries and keys, however fused)
_QK = re.compile(r"(^|_)(q|k|wq|wk|qk|qkv|wqkv|query|key|c_attn|qkvz|q_proj|k_proj|kv_a_proj"
                 r"|q_a_proj|kv_proj|q_conv1d|k_conv1d)(_|$|\d)", re.IGNORECASE)


def _has_experts(module: nn.Module) -> bool:
    """Several parallel experts: a ModuleList of >= 2 identical parameterised blocks, or
    fused expert weights (a parameter with a leading expert dimension, 3-D)."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) >= 2:
            kinds = {type(c) for c in sub}
            if len(kinds) == 1 and all(any(True for _ in c.parameters()) for c in sub):
                return True
        if any(p.dim() == 3 for p in sub.parameters(recurse=False)):
            return True
    return False


def _has_dense(module: nn.Module) -> bool:
    return any(p.dim() == 2 for p in module.parameters())


def _convolves(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in module.modules())


def _queries_and_keys(module: nn.Module) -> bool:
    names = [n.rsplit(".", 1)[-1] for n, _ in module.named_modules()]
    names += [n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()]
    return any(_QK.search(n) for n in names if n)


def _like(value: Any, shape: torch.Size) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dim() >= 2 and value.shape[:2] == shape[:2])


def token_mixing(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 shape: torch.Size) -> bool | None:
    """Whether ``module`` mixes tokens: called as in the layer, with its input changed at
    the first position only, does its output change at a later position? None when the
    call has no input of the hidden state's (batch, sequence) shape to change."""
    if len(shape) < 2 or shape[1] < 2:
        return None
    pos = next((k for k, a in enumerate(args) if _like(a, shape)), None)
    key = None if pos is not None else next(
        (k for k, v in kwargs.items() if _like(v, shape)), None)
    if pos is None and key is None:
        return None
    x = args[pos] if pos is not None else kwargs[key]
    y = x.clone()
    y[:, 0] = y[:, 0] + 1.0 + y[:, 0].abs()
    args2 = tuple(y if k == pos else a for k, a in enumerate(args))
    kwargs2 = {k: (y if k == key else v) for k, v in kwargs.items()}
    try:
        with torch.no_grad():
            a, b = module(*args, **kwargs), module(*args2, **kwargs2)
    except Exception:  # noqa: BLE001 - a module that cannot be called twice: undecided
        return None
    a = next((t for t in torch.utils._pytree.tree_leaves(a) if _like(t, shape)), None)
    b = next((t for t in torch.utils._pytree.tree_leaves(b) if _like(t, shape)), None)
    if a is None or b is None:
        return None
    # a relative change above rounding: a MoE that batches other token sets through its
    # experts after the change rounds differently, but does not mix tokens
    eps = torch.finfo(a.dtype).eps if a.is_floating_point() else 0.0
    change = (a[:, 1:] - b[:, 1:]).abs().max() / a[:, 1:].abs().max().clamp_min(1e-30)
    return bool(change > min(max(eps * 1e3, 1e-12), 0.03))


def mixing_leaves(gm: fx.GraphModule, example: dict[str, Any] | None) -> dict[str, bool]:
    """Per call_module target of a layer graph: whether it mixes tokens, probed on the
    example call of the layer (eval mode, no gradients). Empty without an example."""
    if not example:
        return {}
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    hidden = example.get(names[0])
    if not isinstance(hidden, torch.Tensor) or hidden.is_meta:  # no values to compare
        return {}
    found: dict[str, bool] = {}

    class Probe(fx.Interpreter):
        def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
            mixes = token_mixing(self.fetch_attr(target), args, kwargs, hidden.shape)
            if mixes is not None:
                found[target] = found.get(target, False) or mixes
            return super().call_module(target, args, kwargs)

    was = gm.training
    modules = [(m, m.training) for m in gm.modules()]
    try:
        for m, _ in modules:
            m.training = False
        with torch.no_grad():
            Probe(gm).run(*(example.get(n) for n in names))
    except Exception:  # noqa: BLE001 - classification then falls back to structure
        return found
    finally:
        for m, mode in modules:
            m.training = mode
        gm.training = was
    return found


def module_kind(module: nn.Module, node: fx.Node, hidden: fx.Node,
                overrides: dict[str, str] | None = None,
                routers: set[int] | None = None, mixes: bool | None = None) -> str:
    """Classify one call_module leaf of a layer graph.

    - "attention" / "mixer": it mixes tokens. ``mixes`` is what a probe found (see
      :func:`token_mixing`); without one, a call that consumes layer inputs other than the
      hidden state (attention mask, positions, rotary embeddings) mixes tokens. A token
      mixer with a convolution and no query/key projections (mamba, short conv) is a
      "mixer"; any other (eager, SDPA, fused-qkv, linear, delta-rule) is "attention";
    - "moe": it holds a router (``routers``: ids of the modules the model records router
      logits from) or parallel experts (a router is implied: something must pick);
    - "mlp": other dense parameters; "norm": a normalisation; "other" otherwise.
    ``overrides`` maps the module's attribute name to a kind (see the registry).
    """
    name = str(node.target).rsplit(".", 1)[-1]
    if overrides and name in overrides:
        return overrides[name]
    if is_norm(module):
        return "norm"
    if mixes is None:
        mixes = any(n.op == "placeholder" and n is not hidden for n in node.all_input_nodes)
    if mixes:
        return "mixer" if _convolves(module) and not _queries_and_keys(module) else "attention"
    if routers and any(id(m) in routers for m in module.modules()):
        return "moe"
    if _has_experts(module):
        return "moe"
    if _has_dense(module):
        return "mlp"
    return "other"


def branch_kind(kinds: list[str]) -> str:
    """The kind of a residual branch from the kinds of the modules it calls."""
    for k in ("attention", "moe", "mixer", "mlp"):
        if k in kinds:
            return k
    return "other"


def is_norm_call(modules: dict[str, Any], node: Any) -> bool:
    """Whether ``node`` calls a normalisation module (``modules``: the graph's, by name)."""
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and module_kind(modules[node.target], node, node) == "norm")
