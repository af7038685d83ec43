"""Where a model's decoder layers are, and which modules inside one are traced through.

Found generically, from structure alone: the layers are a group of sibling modules of one
class (:func:`layer_candidates`); inside a layer, children are leaves except containers
and residual gates that hide residual additions (:func:`layer_leaves`). Norms and
combiners are recognised by their parameters and arity (:func:`is_norm`,
:func:`is_combiner`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator, Sequence

from torch import nn

try:
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover - a transformers without it: no layer is one
    GradientCheckpointingLayer = ()  # type: ignore[assignment,misc]


def is_norm(module: nn.Module) -> bool:
    """A normalisation module: no children, only 1-D parameters (weight, maybe bias), one
    tensor in (a module that takes two is a combiner: see :func:`is_combiner`)."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return True
    params = list(module.parameters(recurse=False))
    return (
        not any(True for _ in module.children())
        and bool(params)
        and all(p.dim() == 1 for p in params)
        and _arity(module) <= 1
    )


def _arity(module: nn.Module) -> int:
    """How many positional parameters without a default the module's forward has."""
    try:
        params = list(inspect.signature(inspect.unwrap(type(module).forward)).parameters.values())
    except (TypeError, ValueError):
        return 1
    return sum(1 for p in params[1:]
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty)


def is_combiner(module: nn.Module) -> bool:
    """A module that combines two tensors with only scalar or per-channel weights and no
    submodules (a residual gate ``g * branch + r * residual``): traced through, so the
    residual form it computes is visible."""
    params = list(module.parameters(recurse=False))
    return (not any(True for _ in module.children()) and all(p.dim() <= 1 for p in params)
            and _arity(module) >= 2)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _groups(model: nn.Module) -> Iterator[tuple[str, list[tuple[str, nn.Module]]]]:
    """Every group of sibling modules that could hold the decoder layers, as (container
    name, [(qualified name, module)]): the children of an ``nn.ModuleList``,
    ``nn.Sequential`` or ``nn.ModuleDict``; a plain list or tuple attribute of modules
    (registered elsewhere); and numbered siblings of one class (``block0``, ``block1``)."""
    names = {id(m): n for n, m in model.named_modules()}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) and len(mod):
            kids = [(names[id(c)], c) for c in mod.children()]
            yield name, kids
            run: list[tuple[str, nn.Module]] = []
            for kid in kids + [("", None)]:  # runs of one class inside a mixed container
                if run and (kid[1] is None or type(kid[1]) is not type(run[0][1])):
                    if 1 < len(run) < len(kids):
                        yield name, run
                    run = []
                run.append(kid)
            continue
        for attr, value in vars(mod).items():
            if (isinstance(value, (list, tuple)) and len(value) > 1
                    and all(isinstance(v, nn.Module) and id(v) in names for v in value)):
                yield f"{name}.{attr}" if name else attr, [(names[id(v)], v) for v in value]
        by_prefix: dict[tuple[str, type], list[tuple[int, str, nn.Module]]] = {}
        for child_name, child in mod.named_children():
            m = re.fullmatch(r"(.*?)_?(\d+)", child_name)
            if m and not type(child).__module__.startswith("torch.nn"):
                key = (m.group(1), type(child))
                by_prefix.setdefault(key, []).append((int(m.group(2)), child_name, child))
        for members in by_prefix.values():
            if len(members) > 1:
                members.sort(key=lambda t: t[0])
                yield name, [(names[id(c)], c) for _, _, c in members]


def find_decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder layers of ``model``, as (qualified name, module), in order: the first
    of :func:`layer_candidates`."""
    found = layer_candidates(model)
    return found[0] if found else []


def layer_candidates(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Groups of modules that may be the decoder layers, as (qualified name, module), most
    likely first.

    Hugging Face layers subclass ``GradientCheckpointingLayer``; otherwise the layers are
    groups of sibling parameterised modules of one class held in any container
    (``nn.ModuleList``, ``nn.Sequential``, ``nn.ModuleDict``, a list attribute, numbered
    attributes), those no other group holds first (the experts of a block are inside a
    layer, never the layers themselves), then the largest. The tracer takes the first
    whose modules, on one forward, each take and return the residual stream
    (:func:`~revffn_fx.frontend.capture.residual_shaped`).
    """
    candidates = []
    for name, kids in _groups(model):
        hf = all(isinstance(c, GradientCheckpointingLayer) for _, c in kids)
        same = len({type(c) for _, c in kids}) == 1 and all(_has_params(c) for _, c in kids)
        if hf or same:
            size = sum(p.numel() for _, c in kids for p in c.parameters())
            candidates.append((hf, name, size, kids))
    if not candidates:
        return []
    inside = [{id(m) for _, c in kids for m in c.modules() if m is not c}
              for _, _, _, kids in candidates]

    def outermost(k: int) -> bool:  # no member of it inside another candidate's members
        return not any(id(c) in inside[j] for _, c in candidates[k][3]
                       for j in range(len(candidates)) if j != k)

    ranked = sorted(range(len(candidates)), reverse=True,
                    key=lambda k: (candidates[k][0], outermost(k), candidates[k][2]))
    return [list(candidates[k][3]) for k in ranked]


def layer_leaves(layer: nn.Module, trace_through: Sequence[str] = ()) -> set[nn.Module]:
    """Modules inside ``layer`` that are traced *through* (not leaves).

    The layer's children are leaves, except containers that hold a norm next to a
    composite sublayer (dbrx's ``norm_attn_norm``: norm, attention, norm) and modules that
    combine two tensors with per-channel weights (a residual gate): those hide residual
    additions and are traced through, recursively. A module whose children are
    all atomic (an attention with q/k norms, MLA with its low-rank norms) stays a leaf.
    Classes named in ``trace_through`` are always traced.
    """
    through: set[nn.Module] = {layer}

    def visit(mod: nn.Module) -> None:
        for child in mod.children():
            kids = [k for k in child.children() if _has_params(k)]
            composite = (any(is_norm(k) for k in kids)
                         and any(not is_norm(k) and any(_has_params(g) for g in k.children())
                                 for k in kids))
            if composite or is_combiner(child) or type(child).__name__ in trace_through:
                through.add(child)
                visit(child)

    visit(layer)
    return through
