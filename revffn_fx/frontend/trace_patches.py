"""What is patched while tracing so that transformers' models trace: attention-mask
builders become one opaque node each (:func:`patched_mask_creators`), tensor factories
called with traced sizes become graph nodes (:func:`patched_factories`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree


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
