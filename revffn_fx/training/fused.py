"""The optimizer step fused into the backward pass.

Each trainable parameter gets its own optimizer instance (Adam, AdamW, SGD... act on each
parameter alone, so this is the same update) and is stepped, and its gradient freed, as
soon as its gradient is complete: through ``Tensor.register_post_accumulate_grad_hook`` for
ordinary parameters, and, inside a reversible stack's generated backward, as soon as the
last branch that uses the parameter has been recomputed. Gradients therefore never all
coexist, which is what lets the reversible stack lower the peak of a training step.

What it cannot do, by construction:
- clipping by the global gradient norm needs every gradient at once. Use per-parameter
  clipping (``clip_per_param=``), or run a first backward that only measures the norm and
  a second that steps (twice the compute).
- gradient accumulation over micro-batches: gradients are kept in ``.grad`` (as without
  fusion) on every micro-batch but the last, and the step happens during the last one's
  backward: wrap the earlier micro-batches in ``with fused.accumulating():``.

On several ranks a parameter is stepped only after its gradient has been reduced:
- DDP: pass the ``DistributedDataParallel`` module; a communication hook averages each
  bucket and steps its parameters (DDP still keeps its bucketed gradients, so the fused
  step saves no gradient memory there). Fusing the inner model of a DDP module is refused
  at its first forward, since each rank would step on its own local gradient.
- FSDP2 (``revffn_fx.distributed.shard``): each converted layer's sharded parameters are
  stepped right after that layer's reduce-scatter inside the generated backward; the
  root's (embeddings, final norm, head) at the end of the backward, after FSDP2 reduces
  them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import RevFFNError


def ddp_class() -> Any:
    """``DistributedDataParallel``, or None while torch's DDP module is not loaded (then no
    model can be wrapped in it)."""
    if "torch.nn.parallel.distributed" not in sys.modules:
        return None
    return sys.modules["torch.nn.parallel.distributed"].DistributedDataParallel


def _is_fsdp2(model: nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


class FusedOptimizer(torch.optim.Optimizer):
    """Per-parameter optimizers stepped from backward hooks.

    It is an ``Optimizer`` so LR schedulers and checkpointing work: ``param_groups`` are
    the per-parameter optimizers' own groups (a scheduler's change reaches them), ``step``
    and ``zero_grad`` do nothing (the work happened in backward), ``state_dict`` and
    ``load_state_dict`` save and restore every per-parameter state.
    """

    def __init__(self, model: nn.Module, optimizer_cls: type[torch.optim.Optimizer],
                 clip_per_param: float | None = None,
                 overrides: dict[torch.Tensor, dict[str, Any]] | None = None,
                 **optimizer_kwargs: Any) -> None:
        ddp_cls = ddp_class()
        ddp = model if ddp_cls is not None and isinstance(model, ddp_cls) else None
        if ddp is not None:
            model = ddp.module
        self.ddp: Any = None
        self.mode = "fsdp2" if _is_fsdp2(model) else "local"
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        if not params:
            raise ValueError("no trainable parameters to optimise")
        overrides = overrides or {}
        self.optimizers = {p: optimizer_cls([p], **{**optimizer_kwargs, **overrides.get(p, {})})
                           for p in params}
        self.clip_per_param = clip_per_param
        self.accumulate = False
        self.steps = 0
        self.defaults = dict(next(iter(self.optimizers.values())).defaults)
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self._stepped: list[torch.Tensor] = []  # DDP: gradients DDP wrote back after the step
        self._final_queued = False
        self._hooks: list[Any] = []
        self._sinks = []
        self._param_hooks: list[Any] = []
        if self.mode == "local":
            self._param_hooks = [p.register_post_accumulate_grad_hook(self._on_grad)
                                 for p in params]
            # a DDP wrapped around the model later would average the gradients only after
            # the hooks above stepped on the local ones: refuse at the first forward
            self._hooks.append(model.register_forward_pre_hook(self._refuse_ddp))
        for mod in model.modules():
            opts = getattr(mod, "options", None)
            if opts is not None and hasattr(opts, "grad_sink"):
                if self.mode == "local":
                    opts.grad_sink = self._deliver
                elif self.mode == "fsdp2":
                    opts.reduced_sink = self._on_grad
                    opts.backward_start = self._queue_final
                self._sinks.append(opts)
        # torch's LR schedulers and hooks expect these
        self._optimizer_step_pre_hooks: dict[int, Any] = {}
        self._optimizer_step_post_hooks: dict[int, Any] = {}
        if ddp is not None:
            self.attach_ddp(ddp)

    def attach_ddp(self, ddp: Any) -> None:
        """Step on DDP's averaged gradients: a communication hook averages each bucket and
        steps its parameters (``fuse_optimizer(ddp_model)`` calls this; call it yourself
        when the model was wrapped after the optimizer was built, before the first
        backward). The per-parameter hooks and the stacks' sinks are switched off."""
        if self.ddp is ddp:
            return
        if self.ddp is not None or self.mode != "local":
            raise RevFFNError(f"this fused optimizer already runs in {self.mode} mode")
        for h in self._param_hooks:
            h.remove()
        self._param_hooks = []
        for opts in self._sinks:
            opts.grad_sink = None  # the stacks return gradients to autograd: DDP reduces
        ddp.register_comm_hook(ddp.process_group, self._ddp_hook)
        self._hooks.append(ddp.module.register_forward_pre_hook(self._drop_stepped))
        self.ddp, self.mode = ddp, "ddp"

    # -- the fused step ---------------------------------------------------------------
    def _deliver(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """A complete gradient from inside a reversible stack's backward."""
        p.grad = grad if p.grad is None else p.grad + grad
        self._on_grad(p)

    def _on_grad(self, p: torch.Tensor) -> None:
        if self.accumulate or p.grad is None:
            return
        if self.clip_per_param is not None:
            torch.nn.utils.clip_grad_norm_([p], self.clip_per_param)
        self.optimizers[p].step()
        p.grad = None

    def _refuse_ddp(self, module: nn.Module, args: Any) -> None:
        ddp = ddp_class()
        active = ddp._get_active_ddp_module() if ddp is not None else None
        if active is not None and active is not self.ddp:
            raise RevFFNError("the fused optimizer was built on the model inside a "
                              "DistributedDataParallel: it would step each rank on its local "
                              "gradient before DDP averages it. Build it on the DDP module: "
                              "fuse_optimizer(ddp_model, ...)")

    def _ddp_hook(self, group, bucket):  # type: ignore[no-untyped-def]
        """DDP comm hook: average the bucket across ranks, then step its parameters.
        (Unannotated: DDP checks annotations against its own classes, and this module's
        are strings.)"""
        import torch.distributed as dist

        buf = bucket.buffer()
        world = group.size() if group is not None else dist.get_world_size()
        buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

        def step(fut: torch.futures.Future) -> torch.Tensor:
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                if self.accumulate or p not in self.optimizers:
                    continue
                p.grad = g
                self._on_grad(p)
                self._stepped.append(p)
            return fut.value()[0]

        return fut.then(step)

    def _drop_stepped(self, module: nn.Module, args: Any) -> None:
        # DDP copies the averaged bucket back into .grad after the hook stepped it; those
        # gradients are spent, and must not accumulate into the next step's
        for p in self._stepped:
            p.grad = None
        self._stepped.clear()

    def _queue_final(self) -> None:
        """FSDP2: at the end of this backward (after FSDP2's own final callback, queued
        earlier, has reduced the root's gradients), step what is left."""
        if not self._final_queued:
            self._final_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._final)

    def _final(self) -> None:
        self._final_queued = False
        for p in self.optimizers:
            if p.grad is not None:
                self._on_grad(p)

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Keep gradients (no step) for the micro-batches inside the block."""
        was = self.accumulate
        self.accumulate = True
        try:
            yield
        finally:
            self.accumulate = was

    # -- the Optimizer surface --------------------------------------------------------
    def step(self, closure: Any = None) -> None:  # noqa: D401 - the step ran in backward
        """No-op: parameters were stepped during backward. Counts calls for schedulers.
        Under FSDP2, steps any parameter whose reduced gradient is still waiting (a model
        whose backward ran no reversible stack)."""
        self.steps += 1
        if self.mode == "fsdp2" and not self.accumulate:
            self._final()
        if closure is not None:
            with torch.enable_grad():
                closure()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop gradients kept by accumulation; normally there are none."""
        for p in self.optimizers:
            p.grad = None

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        """Every parameter's state, as one optimizer's ``state`` (parameter -> its state);
        ``torch.distributed.checkpoint`` reads it to tell whether states exist."""
        return {p: opt.state[p] for p, opt in self.optimizers.items() if opt.state.get(p)}

    def state_dict(self) -> dict[str, Any]:
        """In the layout of ``torch.optim.Optimizer.state_dict``: ``state`` by parameter
        index, one group per parameter, parameters in ``param_groups`` order (what
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` maps to
        parameter names); plus ``steps``."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        for i, opt in enumerate(self.optimizers.values()):
            sd = opt.state_dict()
            if sd["state"]:
                state[i] = next(iter(sd["state"].values()))
            groups.append({**sd["param_groups"][0], "params": [i]})
        return {"state": state, "param_groups": groups, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s layout (or an ordinary optimizer's over the same
        parameters in the same order; or the older ``per_param`` layout). Parameters are
        matched by position, as ``torch.optim.Optimizer.load_state_dict`` does, so the keys
        may be indices or the parameter names DCP uses."""
        if "per_param" in state_dict:  # written by revffn-fx before the layout above
            per = state_dict["per_param"]
            if len(per) != len(self.optimizers):
                raise ValueError(f"state has {len(per)} parameters, this optimizer "
                                 f"{len(self.optimizers)}")
            for opt, sd in zip(self.optimizers.values(), per):
                opt.load_state_dict(sd)
        else:
            saved = [(key, group) for group in state_dict["param_groups"]
                     for key in group["params"]]
            if len(saved) != len(self.optimizers):
                raise ValueError(f"state has {len(saved)} parameters, this optimizer "
                                 f"{len(self.optimizers)}")
            states = state_dict["state"]
            for opt, (key, group) in zip(self.optimizers.values(), saved):
                hyper = {k: v for k, v in group.items() if k != "params"}
                opt.load_state_dict({"state": {0: states[key]} if key in states else {},
                                     "param_groups": [{**hyper, "params": [0]}]})
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.steps = state_dict.get("steps", 0)

    def remove(self) -> None:
        """Detach from the model: remove hooks and sinks."""
        for h in self._hooks + self._param_hooks:
            h.remove()
        for opts in self._sinks:
            opts.grad_sink = None
            opts.reduced_sink = None
            opts.backward_start = None

    def __repr__(self) -> str:
        opt = next(iter(self.optimizers.values()))
        return (f"FusedOptimizer({type(opt).__name__}, {len(self.optimizers)} parameters, "
                f"lr={self.param_groups[0]['lr']})")


def fuse_optimizer(model: nn.Module,
                   optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                   clip_per_param: float | None = None,
                   overrides: dict[torch.Tensor, dict[str, Any]] | None = None,
                   **optimizer_kwargs: Any) -> FusedOptimizer:
    """Fuse ``optimizer_cls(**optimizer_kwargs)`` into the backward of ``model`` (a
    RevModel or any module; under DDP the ``DistributedDataParallel`` module itself; under
    FSDP2 the model after :func:`revffn_fx.distributed.shard`).

    After this, ``loss.backward()`` also updates every trainable parameter and frees its
    gradient; call ``opt.step()`` / ``scheduler.step()`` as usual (step is a no-op).
    ``overrides`` maps a parameter to keyword arguments of its own (e.g. no weight decay
    for norms and biases).
    """
    return FusedOptimizer(model, optimizer_cls, clip_per_param, overrides, **optimizer_kwargs)
