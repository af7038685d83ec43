"""A torch.fx tracer for causal language models, Hugging Face or hand-written.

Two levels are traced:
- the model: ``(input_ids, attention_mask, labels) -> (logits, loss)`` with each decoder
  layer a single ``call_module`` node (the model itself is called in its own convention,
  see ``ir.convention_of``);
- each decoder layer: ``(hidden_states, <the keyword arguments the model passes>)`` with
  attention, MoE/MLP and norm modules as leaves, so the residual structure is plain.

Structure is found generically (see :func:`find_decoder_layers`, :func:`layer_leaves`);
nothing here knows about couplings.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import TraceError


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
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers is a dependency
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
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


class RevTracer(fx.Tracer):
    """fx.Tracer with a leaf policy given as a predicate, and error context.

    ``leaf(module, qualname) -> bool | None``: True/False decides, None falls back to
    torch's default (torch.nn modules are leaves).
    """

    def __init__(self, leaf: Callable[[nn.Module, str], bool | None],
                 leaf_modules: Sequence[str] = (), inner: str = "", prefix: str = "") -> None:
        super().__init__()
        self.inner, self.prefix = inner, prefix
        # buffers become get_attr nodes, so `self.causal[:t, :t]` with a traced `t` works
        self.proxy_buffer_attributes = True
        self._leaf = leaf
        self._user_leaves = set(leaf_modules)
        self.module_stack_names: list[str] = []
        # (qualified name, module) of the innermost module being traced when tracing failed
        self.failed_in: tuple[str, nn.Module] | None = None
        # ids of modules that must stay visible (the decoder layers): never advise to hide
        # a module that holds them
        self.protected: set[int] = set()
        self._constants: list[Any] = []

    def user_name(self, qualname: str) -> str:
        """The name a user knows a module by: relative to ``inner``, after ``prefix``."""
        if self.inner and (qualname == self.inner or qualname.startswith(self.inner + ".")):
            qualname = qualname[len(self.inner) + 1:]
        return ".".join(p for p in (self.prefix, qualname) if p)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.inner and module_qualified_name == self.inner:
            return False  # the module being traced is always traced through
        if (type(m).__name__ in self._user_leaves
                or self.user_name(module_qualified_name) in self._user_leaves):
            return True
        decided = self._leaf(m, module_qualified_name)
        if decided is not None:
            return decided
        return super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        """Objects torch.fx cannot put in a graph (a custom argument object such as a
        ``KVSharingDict``) become constant attributes of the root, read by get_attr."""
        try:
            return super().create_arg(a)
        except NotImplementedError:
            if _holds_proxy(a):
                where = _user_frame(traceback.extract_stack())
                raise TraceError(
                    f"a {type(a).__name__} object holding traced values is passed to a "
                    f"module{f', at {where}' if where else ''}: torch.fx cannot put it in a "
                    "graph") from None
            name = f"_revffn_const_{len(self._constants)}"
            self._constants.append(a)
            setattr(self.root, name, a)
            return self.create_node("get_attr", name, (), {})

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple,
                    kwargs: dict) -> Any:
        self.module_stack_names.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.module_stack_names[-1], m)
            raise
        finally:
            self.module_stack_names.pop()


def _holds_proxy(value: Any, depth: int = 3) -> bool:
    """``value`` (an object, a container) holds an fx.Proxy within ``depth`` levels."""
    if isinstance(value, fx.Proxy):
        return True
    if depth == 0 or isinstance(value, (nn.Module, type, str, bytes)):
        return False
    if isinstance(value, dict):
        items: Any = value.values()
    elif isinstance(value, (list, tuple, set)):
        items = value
    elif hasattr(value, "__dict__"):
        items = vars(value).values()
    else:
        return False
    return any(_holds_proxy(v, depth - 1) for v in items)


def _opaque(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``fn`` so that, called with proxies, it becomes one call_function node.

    Non-proxy arguments (a config object, None) are bound into the node's target, so the
    graph stays executable; the real function runs at run time.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        proxies = {k: v for k, v in kwargs.items() if isinstance(v, fx.Proxy)}
        if not proxies or any(isinstance(a, fx.Proxy) for a in args):
            return fn(*args, **kwargs)
        consts = {k: v for k, v in kwargs.items() if k not in proxies}

        def bound(**kw: Any) -> Any:
            return fn(*args, **consts, **kw)

        bound.__name__ = fn.__name__
        bound.__qualname__ = fn.__name__
        tracer = next(iter(proxies.values())).tracer
        return tracer.create_proxy("call_function", bound, (), proxies)

    return wrapper


@contextmanager
def patched_mask_creators(model: nn.Module) -> Iterator[None]:
    """Make transformers' attention-mask builders opaque while tracing ``model``.

    They branch on shapes and dtypes (``torch.finfo(proxy.dtype)``), so they cannot be
    traced; every ``create_*mask*`` function a modeling module imported from
    ``transformers.masking_utils`` becomes one node instead.
    """
    patched: list[tuple[Any, str, Any]] = []
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    for mod in modules:
        if mod is None:
            continue
        for name, obj in list(vars(mod).items()):
            if (callable(obj) and "mask" in name and name.startswith("create_")
                    and getattr(obj, "__module__", "") == "transformers.masking_utils"):
                patched.append((mod, name, obj))
                setattr(mod, name, _opaque(obj))
    try:
        yield
    finally:
        for mod, name, obj in patched:
            setattr(mod, name, obj)


# tensor factories that take sizes: called with traced sizes (``torch.ones(t, t)`` where
# ``t = x.shape[1]``) they become graph nodes instead of failing
FACTORIES = ("ones", "zeros", "full", "empty", "arange", "eye", "rand", "randn", "randint",
             "linspace", "tril_indices", "triu_indices")


def _proxy_in(values: Any) -> fx.Proxy | None:
    from torch.utils import _pytree as pytree

    return next((v for v in pytree.tree_leaves(values) if isinstance(v, fx.Proxy)), None)


@contextmanager
def patched_factories() -> Iterator[None]:
    """While tracing, ``torch.<factory>(..)`` with a traced size is one call_function node."""
    import torch

    saved = {name: getattr(torch, name) for name in FACTORIES}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            proxy = _proxy_in((args, kwargs))
            if proxy is None:
                return fn(*args, **kwargs)
            if len(args) == 1 and isinstance(args[0], (tuple, list)):
                args = tuple(args[0])  # torch.ones((t, t)) -> torch.ones(t, t)
            return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

        return wrapper

    for name, fn in saved.items():
        setattr(torch, name, wrap(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def _user_frame(frames: Sequence[traceback.FrameSummary]) -> str:
    """``file:line`` of the innermost of ``frames`` in the model's own code (not torch,
    not revffn-fx), or ""."""
    skip = (os.sep + "torch" + os.sep, os.sep + "revffn_fx" + os.sep, "<revffn wrapper")
    found = ""
    for frame in frames:
        if not any(k in frame.filename for k in skip):
            found = f"{frame.filename}:{frame.lineno}"
    return found


def _where(exc: BaseException) -> str:
    """Where in the model's own code ``exc`` was raised (see :func:`_user_frame`)."""
    return _user_frame(traceback.extract_tb(exc.__traceback__))


# what torch.fx says when Python code branches on, iterates or converts a traced value
_CONTROL_FLOW = ("control flow", "cannot be iterated", "symbolically traced", "Proxy")


def _explain(exc: Exception, tracer: RevTracer, what: str, tried: str = "") -> TraceError:
    cls = type(exc).__name__
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else cls
    where = _where(exc)
    if where:
        msg = f"{msg}, at {where}"
    failed = tracer.failed_in
    call = f"tried {tried}: " if tried else ""
    if failed is None or failed[0] == tracer.inner:
        if not any(s in msg for s in _CONTROL_FLOW):
            return TraceError(
                f"cannot trace the forward of {what} itself: {call}it raised {cls}: {msg}")
        return TraceError(
            f"cannot trace the forward of {what} itself ({call}{cls}: {msg}); torch.fx cannot "
            "follow data-dependent Python control flow (an if, assert or loop on a tensor's "
            "values or shape) outside submodules: drop such checks, or move that code into a "
            "submodule and keep it whole with rf.trace(model, leaf_modules=[<its class name>])")
    name, mod = tracer.user_name(failed[0]), type(failed[1]).__name__
    if any(id(m) in tracer.protected for m in failed[1].modules()):
        return TraceError(
            f"cannot trace {name} ({mod}), which holds the decoder layers ({cls}: {msg}): its "
            "forward has data-dependent Python control flow torch.fx cannot follow, and keeping "
            "it whole would hide the layers; this model's forward is not supported yet")
    return TraceError(
        f"cannot trace {name} ({mod}) ({cls}: {msg}); keep it whole (untraced) with "
        f"rf.trace(model, leaf_modules=[{mod!r}]) or leaf_modules=[{name!r}]")


def trace_module(root: nn.Module, leaf: Callable[[nn.Module, str], bool | None],
                 leaf_modules: Sequence[str], what: str,
                 concrete_args: dict[str, Any] | None = None,
                 patch_masks_of: nn.Module | None = None,
                 inner: str = "", prefix: str = "",
                 protected: set[int] | None = None, tried: str = "",
                 auto_leaves: set[str] | None = None) -> fx.GraphModule:
    """Trace ``root`` into a GraphModule, turning failures into a :class:`TraceError`.

    ``root`` is usually a wrapper holding the module of interest as attribute ``inner``;
    user-facing qualified names (errors, ``leaf_modules``) are relative to that module,
    with ``prefix`` (its own qualified name) in front.

    A submodule whose trace fails is kept whole (a leaf) and the trace retried, unless it
    is the module being traced or holds a ``protected`` module; ``auto_leaves`` (when
    given) receives the user-facing names of the modules so kept.
    """
    auto: set[str] = set()
    while True:
        tracer = RevTracer(leaf, [*leaf_modules, *auto], inner=inner, prefix=prefix)
        tracer.protected = set(protected or ())
        try:
            with patched_factories():
                if patch_masks_of is not None:
                    with patched_mask_creators(patch_masks_of):
                        graph = tracer.trace(root, concrete_args=concrete_args)
                else:
                    graph = tracer.trace(root, concrete_args=concrete_args)
        except TraceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear line
            failed = tracer.failed_in
            if (failed is not None and failed[0] != tracer.inner and len(auto) < 64
                    and not any(id(m) in tracer.protected for m in failed[1].modules())
                    and tracer.user_name(failed[0]) not in auto):
                auto.add(tracer.user_name(failed[0]))  # keep it whole and try again
                continue
            raise _explain(exc, tracer, what, tried) from exc
        break
    if auto_leaves is not None:
        auto_leaves.update(auto)
    return fx.GraphModule(tracer.root, graph, class_name=type(root).__name__ + "Graph")


def make_call_wrapper(target: nn.Module, params: Sequence[str], consts: dict[str, Any],
                      attr: str = "inner") -> nn.Module:
    """A module whose ``forward(self, <params>)`` calls ``target`` by keyword.

    fx traces a function by its code object, so the signature must be real: it is
    generated. ``consts`` are passed as keywords too (``cache=None, use_cache=False``).
    """
    for p in params:
        if not p.isidentifier():
            raise TraceError(f"cannot trace: argument name {p!r} is not an identifier")
    sig = ", ".join(params)
    call = ", ".join(f"{p}={p}" for p in params)
    src = (f"def forward(self, {sig}):\n"
           f"    return self.{attr}({call}, **self._consts)\n")
    ns: dict[str, Any] = {}
    exec(compile(src, f"<revffn wrapper of {type(target).__name__}>", "exec"), ns)  # noqa: S102
    cls = type(f"{type(target).__name__}Call", (nn.Module,), {"forward": ns["forward"]})
    wrapper = cls()
    wrapper.add_module(attr, target)
    wrapper._consts = dict(consts)
    return wrapper


def signature_names(fn: Callable[..., Any]) -> set[str]:
    """Parameter names of ``fn`` (empty when it takes ``**kwargs`` only)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def strip_prefix(gm: fx.GraphModule, root: nn.Module, prefix: str) -> fx.GraphModule:
    """Re-root a graph traced through a wrapper so targets are relative to ``root``."""
    graph = gm.graph
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and isinstance(node.target, str):
            if node.target.startswith(prefix + "."):
                node.target = node.target[len(prefix) + 1:]
    consts = {n.target: getattr(gm, n.target) for n in graph.nodes
              if n.op == "get_attr" and str(n.target).startswith("_revffn_const_")}
    for name, value in consts.items():  # constant argument objects (Tracer.create_arg)
        setattr(root, name, value)
    try:
        return fx.GraphModule(root, graph, class_name=type(root).__name__ + "Graph")
    finally:
        for name in consts:
            delattr(root, name)
