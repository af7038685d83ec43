"""A torch.fx tracer for causal language models, Hugging Face or hand-written.

Two levels are traced:
- the model: ``(input_ids, attention_mask, labels) -> (logits, loss)`` with each decoder
  layer a single ``call_module`` node (the model itself is called in its own convention,
  see ``ir.convention_of``);
- each decoder layer: ``(hidden_states, <the keyword arguments the model passes>)`` with
  attention, MoE/MLP and norm modules as leaves, so the residual structure is plain.

Structure is found generically (see :mod:`.decoder_layers`); while tracing, transformers'
mask builders and tensor factories are patched (:func:`patched_mask_creators`,
:func:`patched_factories`); a failure becomes one line saying where and what to do
(:func:`trace_module`). Nothing here knows about couplings.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .decoder_layers import is_norm, layer_candidates, layer_leaves

# the layer search is imported from here by the IR (the tracer's leaf policy reads it)
__all__ = ["RevTracer", "is_norm", "layer_candidates", "layer_leaves", "make_call_wrapper",
           "signature_names", "strip_prefix", "trace_module"]


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
    return next((v for v in pytree.tree_leaves(values) if isinstance(v, fx.Proxy)), None)


@contextmanager
def patched_factories() -> Iterator[None]:
    """While tracing, ``torch.<factory>(..)`` with a traced size is one call_function node."""
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
