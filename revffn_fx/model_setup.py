"""What building a RevModel decides, step by step: the checked options, which decoder
layers to convert, the stream each residual update writes, the coupling's adapters, the
runtime options; and small readers of the wrapped model (its hidden size, its token
embedding, a layer spec, a stream dtype).

:meth:`revffn_fx.model.RevModel.__init__` calls these in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import couplings
from .errors import ConversionError, RevFFNError
from .frontend.plan import Plan
from .options import TransformOptions, check_amplification, parse_layer_spec
from .passes.analyze import describe_pairing, update_targets
from .passes.couple import make_adapters
from .runtime import fixed_point as fixed_points
from .runtime.layers import RuntimeOptions, wider_stream_dtype
from .runtime.router import RouterTap, find_routers

_STREAM_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                  "bfloat16": torch.bfloat16, "float16": torch.float16,
                  "int32": torch.int32}  # int32: the exact streams' grid (runtime/grid.py)


def parse_layers(spec: str | Sequence[int] | None, n: int) -> list[int] | None:
    """``"0-3,6"`` or a list of ints -> sorted layer indices; None means all."""
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = parse_layer_spec(spec)
    bad = [i for i in spec if not 0 <= i < n]
    if bad:
        raise RevFFNError(f"layer {bad[0]} out of range: the model has {n} layers (0-{n - 1})")
    return sorted(set(spec))


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding: ``get_input_embeddings()`` or the first nn.Embedding."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb or next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def hidden_size_of(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "d_model", "n_embd"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    emb = input_embeddings(model)
    if emb is None:
        raise ConversionError("cannot tell the hidden size: no config.hidden_size and no "
                              "input embeddings")
    return emb.weight.shape[1]


def parse_stream_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a floating torch dtype (or int32, the exact streams' grid), or its name
    ("float64", "float32", "int32", ...)."""
    if value is None or isinstance(value, torch.dtype) and (value.is_floating_point
                                                            or value == torch.int32):
        return value
    if isinstance(value, str) and value.replace("torch.", "") in _STREAM_DTYPES:
        return _STREAM_DTYPES[value.replace("torch.", "")]
    raise RevFFNError(f"unknown stream dtype {value!r}; choose from {', '.join(_STREAM_DTYPES)}")


def checked_options(model: nn.Module, coupling: str, options: TransformOptions | None,
                    option_kwargs: dict[str, Any]) -> TransformOptions:
    """The options, built from the keywords when not given (checked once, in one place),
    resolved for the model's dtype (:meth:`TransformOptions.resolved`)."""
    if options is None:
        options = TransformOptions.build(coupling=coupling, **option_kwargs)
    elif option_kwargs:
        raise RevFFNError(f"pass the options either as options= or as keywords, not both "
                          f"({sorted(option_kwargs)[0]})")
    return options.resolved(str(next(model.parameters()).dtype))


def choose_layers(plan: Plan, coupling: str, layers: Sequence[int] | None) -> list[int]:
    """The decoder layers to convert: the convertible ones among ``layers`` (default: all);
    a wanted layer that cannot be converted, or no convertible layer at all, is refused.
    The exact mode converts none."""
    exact = coupling == couplings.EXACT
    wanted = parse_layers(None if layers is None else list(layers), len(plan.layers))
    if exact and wanted:
        raise RevFFNError("the exact mode (coupling 'none') converts no layer: leave "
                          "out layers")
    chosen = [lp.index for lp in plan.layers if not exact
              and lp.convertible and (wanted is None or lp.index in wanted)]
    if wanted is not None:
        refused = [lp for lp in plan.layers if lp.index in wanted and not lp.convertible]
        if refused:
            lp = refused[0]
            raise ConversionError(
                f"layer {lp.index} ({lp.qualname}) cannot be converted: {lp.reason}")
    if not chosen and not exact:
        reasons = {lp.reason for lp in plan.layers if not lp.convertible}
        raise ConversionError("no convertible decoder layer"
                              + (f": {sorted(reasons)[0]}" if reasons else ""))
    return chosen


def check_scaled_streams(spec: Any, options: TransformOptions, plan: Plan,
                         chosen: Sequence[int], model_dtype: torch.dtype) -> None:
    """A scaled coupling (momentum, meft) without exact streams: refuse a depth at which
    dividing by its scale on the way back amplifies rounding beyond the stream dtype."""
    if not spec.scaled or options.exact_streams:
        return
    scaled = sum(spec.scaled_updates(len(plan.layers[i].sublayers)) for i in chosen)
    check_amplification(options.coupling, float(spec.scale(options.to_dict())), scaled,
                        options.stream_dtype or str(wider_stream_dtype(
                            model_dtype)).replace("torch.", ""))


def pair_updates(plan: Plan, chosen: Sequence[int], spec: Any) -> dict[int, list[int]]:
    """The stream each residual update of a converted layer writes (0: X1, 1: X2):
    alternating, across layer boundaries too (a layer with three updates ends on X1, the
    next starts on X2); the plan says so in words (``LayerPlan.pairing``, set here)."""
    targets: dict[int, list[int]] = {}
    start = 0
    for i in chosen:
        lp = plan.layers[i]
        if spec.whole_layer:  # the layer is one update (bdia)
            targets[i] = [start]
            lp.pairing = f"the whole layer -> X{start + 1} (reads X{2 - start})"
            start = (start + 1) % 2
            continue
        targets[i] = update_targets(lp, start)
        lp.pairing = describe_pairing(lp, start)
        start = (start + len(lp.sublayers)) % 2
    return targets


def coupling_adapters(spec: Any, targets: dict[int, list[int]], hidden_size: int,
                      param: torch.Tensor) -> nn.ModuleDict:
    """The coupling's new parameters per converted layer (revffn's adapters; none for the
    couplings without), in the dtype and on the device of ``param``."""
    adapters = nn.ModuleDict()
    if spec.adapter_params:
        for i, layer_targets in targets.items():
            adapters[str(i)] = make_adapters(hidden_size, param.dtype, param.device,
                                             layer_targets)
    return adapters


def runtime_options(options: TransformOptions, model: nn.Module) -> RuntimeOptions:
    """The stacks' runtime options: the router tap (when the model has routers), the fixed
    point's budget, the stream dtype, exact streams, the guard, the token chunk."""
    routers, index = find_routers(model)
    run = RuntimeOptions(router_tap=RouterTap(routers, index) if routers else None)
    # the fixed point's default tolerance follows the dtype the branches compute in;
    # fp64's 1e-11 takes more steps of a slow contraction than fp32's 1e-6
    dtype = next(model.parameters()).dtype
    iters, tol = options.fixed_point_iters, options.fixed_point_tol
    run.fixed_point_iters = iters if iters is not None else fixed_points.fixed_point_iters(dtype)
    run.fixed_point_tol = tol if tol is not None else fixed_points.fixed_point_tolerance(dtype)
    run.stream_dtype = parse_stream_dtype(options.stream_dtype)
    run.exact_streams = options.exact_streams
    run.guard = options.guard
    run.token_chunk = options.token_chunk
    return run
