"""The two-stage RevFFN fine-tuning recipe as a ``transformers.TrainerCallback``.

Stage 1 (warm-up): only the new parameters train (the RevFFN adapters, optionally the
norms), so the adapters learn to drive the pretrained attention and MoE modules. Stage 2:
every parameter trains.

How the optimizer sees this. ``Trainer`` (and TRL's ``SFTTrainer``, a subclass) builds its
optimizer in ``create_optimizer`` over the parameters with ``requires_grad`` set *at that
moment*, and it does so before ``on_train_begin``. The callback therefore freezes in
``on_train_begin``, after the optimizer exists: every parameter is already in a param group,
frozen ones just have ``grad is None``, and torch optimizers skip such parameters entirely
(no update, no weight decay, no moment state). Unfreezing flips ``requires_grad`` back; the
next step updates them. Nothing is rebuilt, so the adapters' Adam moments survive the
switch and the LR scheduler keeps pointing at the same param groups. As a safety net, any
parameter about to be unfrozen that is not in the optimizer (frozen by the user before the
Trainer was built, or a custom optimizer) is appended to an existing param group of the same
weight-decay kind, so it is updated too.

Learning rates: ``warmup_lr`` and ``full_lr`` replace ``args.learning_rate`` in their stage;
the Trainer's schedule (warm-up, decay) is kept and applied on top, by rescaling each
group's ``lr`` and the scheduler's ``base_lrs`` at the two switches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["TwoStageCallback", "is_new_parameter", "is_norm_parameter"]


def is_new_parameter(name: str) -> bool:
    """True for parameters a RevModel adds (``adapters.<layer>.*``), wrapped or not."""
    return name.startswith("adapters.") or ".adapters." in name


def is_norm_parameter(name: str) -> bool:
    """True for normalisation weights (any module path component containing 'norm')."""
    return any("norm" in part.lower() for part in name.split(".")[:-1])


def _inner(obj: Any, attr: str) -> Any:
    """Unwrap accelerate's AcceleratedOptimizer / AcceleratedScheduler."""
    while not hasattr(obj, attr) and hasattr(obj, "optimizer" if attr == "param_groups"
                                              else "scheduler"):
        obj = getattr(obj, "optimizer" if attr == "param_groups" else "scheduler")
    return obj


class TwoStageCallback(TrainerCallback):
    """Train only new parameters for ``warmup_steps`` optimizer steps, then all of them.

    ``warmup_steps``: length of stage 1 in optimizer updates (``state.global_step``).
    ``warmup_lr`` / ``full_lr``: the peak learning rate of each stage (default
    ``args.learning_rate``). ``train_norms``: also train norm weights in stage 1.
    ``is_new``: which parameter names count as new (default: RevModel adapters).
    If the model has no new parameters (e.g. the ``revnet`` coupling), stage 1 is skipped.
    ``stage`` is ``"idle"``, ``"warmup"`` or ``"full"``; ``switched_at`` the global step of
    the unfreeze.
    """

    def __init__(self, warmup_steps: int = 100, warmup_lr: float | None = None,
                 full_lr: float | None = None, train_norms: bool = False,
                 is_new: Callable[[str], bool] = is_new_parameter) -> None:
        if warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        self.warmup_steps = warmup_steps
        self.warmup_lr = warmup_lr
        self.full_lr = full_lr
        self.train_norms = train_norms
        self.is_new = is_new
        self.stage = "idle"
        self.switched_at: int | None = None
        self._frozen: list[tuple[str, torch.nn.Parameter]] = []
        self._factor = 1.0  # current lr multiplier relative to args.learning_rate

    # -- helpers --
    def _warm_trainable(self, name: str) -> bool:
        return self.is_new(name) or (self.train_norms and is_norm_parameter(name))

    def _rescale(self, optimizer: Any, scheduler: Any, factor: float) -> None:
        """Move every group's lr (and the scheduler's base lrs) to ``factor`` x args lr."""
        ratio = factor / self._factor
        if ratio == 1.0:
            return
        groups = _inner(optimizer, "param_groups").param_groups if optimizer else []
        for g in groups:
            g["lr"] = g["lr"] * ratio
            if "initial_lr" in g:
                g["initial_lr"] = g["initial_lr"] * ratio
        sched = _inner(scheduler, "base_lrs") if scheduler is not None else None
        if sched is not None and hasattr(sched, "base_lrs"):
            sched.base_lrs = [lr * ratio for lr in sched.base_lrs]
            if hasattr(sched, "_last_lr"):
                sched._last_lr = [g["lr"] for g in groups]
        self._factor = factor

    @staticmethod
    def _ensure_in_optimizer(optimizer: Any,
                             params: Iterable[tuple[str, torch.nn.Parameter]]) -> int:
        """Append parameters missing from ``optimizer`` to a matching group; return count."""
        if optimizer is None:
            return 0
        groups = _inner(optimizer, "param_groups").param_groups
        present = {id(p) for g in groups for p in g["params"]}
        decay = max(groups, key=lambda g: g.get("weight_decay", 0.0))
        no_decay = min(groups, key=lambda g: g.get("weight_decay", 0.0))
        added = 0
        for name, p in params:
            if id(p) in present:
                continue
            wants_decay = p.ndim >= 2 and not is_norm_parameter(name)
            (decay if wants_decay else no_decay)["params"].append(p)
            present.add(id(p))
            added += 1
        return added

    def _unfreeze(self, optimizer: Any, scheduler: Any, args: TrainingArguments,
                  step: int) -> None:
        for _, p in self._frozen:
            p.requires_grad_(True)
        added = self._ensure_in_optimizer(optimizer, self._frozen)
        if added:
            logger.warning("TwoStageCallback: %d parameters were not in the optimizer; "
                           "added them to its param groups", added)
        self._rescale(optimizer, scheduler, (self.full_lr or args.learning_rate)
                      / args.learning_rate)
        self._frozen = []
        self.stage = "full"
        self.switched_at = step

    # -- events --
    def on_train_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, model: torch.nn.Module | None = None,
                       optimizer: Any = None, lr_scheduler: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise ValueError("TwoStageCallback needs the model (passed by Trainer)")
        self._factor = 1.0
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        warm = [n for n, _ in named if self._warm_trainable(n)]
        if state.global_step >= self.warmup_steps or not warm:
            if not warm and self.warmup_steps:
                logger.warning("TwoStageCallback: no new parameters in the model; "
                               "skipping the warm-up stage")
            self._frozen = []
            self._rescale(optimizer, lr_scheduler,
                          (self.full_lr or args.learning_rate) / args.learning_rate)
            self.stage = "full"
            self.switched_at = state.global_step
            return
        self._frozen = [(n, p) for n, p in named if not self._warm_trainable(n)]
        for _, p in self._frozen:
            p.requires_grad_(False)
            p.grad = None
        self._rescale(optimizer, lr_scheduler,
                      (self.warmup_lr or args.learning_rate) / args.learning_rate)
        self.stage = "warmup"
        logger.info("TwoStageCallback: warm-up of %d steps training %d of %d tensors",
                    self.warmup_steps, len(warm), len(named))

    def on_step_end(self, args: TrainingArguments, state: TrainerState,
                    control: TrainerControl, optimizer: Any = None, lr_scheduler: Any = None,
                    **kwargs: Any) -> None:
        if self.stage == "warmup" and state.global_step >= self.warmup_steps:
            self._unfreeze(optimizer, lr_scheduler, args, state.global_step)
            logger.info("TwoStageCallback: all parameters unfrozen at step %d",
                        state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        """Training stopped inside the warm-up: give the frozen parameters back their grad."""
        for _, p in self._frozen:
            p.requires_grad_(True)
        self._frozen = []
