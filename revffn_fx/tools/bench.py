"""``revffn bench``: memory and time of a training step, reversible against the usual choices.

For each depth, one model (random weights, fixed seed) is built and every method runs a
training step on it (forward, causal-LM loss, backward; train mode; fixed inputs):

- ``none``: plain autograd, every activation kept;
- ``checkpoint``: transformers' activation checkpointing (non-reentrant);
- ``revffn`` / ``revnet``: :func:`revffn_fx.transform` with that coupling;
- ``revffn-cross``: revffn with the paper's cross-branch attention (fixed-point inverse);
  not in the default set, ask for it with ``--methods``.

Per (depth, method) it measures the bytes saved for backward and the peak of live tensor
bytes during the step (:mod:`revffn_fx.tools.measure_memory`, exact and
machine-independent; parameters are the baseline), the same peak when each gradient is
dropped as soon as it is complete (what an optimizer fused into the backward sees), the
median step time after warm-up (methods interleaved, so load on the machine hits them
alike) and, on CUDA, ``torch.cuda.max_memory_allocated`` and tokens/s. Ratios are to
``checkpoint`` measured in the same run. Heavy imports (torch, transformers, matplotlib)
happen inside functions, so ``revffn --help`` stays fast.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from revffn_fx.errors import RevFFNError
from revffn_fx.tools.bench_models import parse_dtype
from revffn_fx.tools.bench_result import BenchResult, Measurement
from revffn_fx.tools.machine_info import machine_info

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS: tuple[str, ...] = ("none", "checkpoint", "revffn", "revnet")
EXTRA_METHODS: tuple[str, ...] = ("revffn-cross",)
ProgressFn = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------------- runner

class _Runner:
    """One method on one model: a callable ``(ids, labels) -> output`` and its parameters."""

    def __init__(self, method: str, model: nn.Module) -> None:
        self.method = method
        self.base = model
        if method in ("none", "checkpoint"):
            self.module = model
        else:
            import revffn_fx as rf

            if method == "revffn-cross":
                self.module = rf.transform(model, coupling="revffn", attention="cross").train()
            else:
                self.module = rf.transform(model, coupling=method).train()
        seen: dict[int, Any] = {}
        for p in self.module.parameters():
            seen.setdefault(id(p), p)
        self.params = list(seen.values())

    @contextmanager
    def active(self) -> Iterator[None]:
        """Checkpointing switched on for ``checkpoint`` only (the layers are shared)."""
        if self.method != "checkpoint":
            yield
            return
        enable = getattr(self.base, "activation_checkpointing_enable", None) \
            or self.base.gradient_checkpointing_enable
        disable = getattr(self.base, "activation_checkpointing_disable", None) \
            or self.base.gradient_checkpointing_disable
        enable({"use_reentrant": False})
        try:
            yield
        finally:
            disable()

    def zero(self) -> None:
        for p in self.params:
            p.grad = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kw = {"use_cache": False} if self.module is self.base else {}
        return self.module(ids, labels=ids, **kw).loss

    def step(self, ids: torch.Tensor) -> float:
        loss = self.forward(ids)
        loss.backward()
        return float(loss.detach())


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _grads_freed_on_arrival(params: Sequence[torch.Tensor],
                            module: Any = None) -> Iterator[None]:
    """Drop each gradient as soon as it is complete (an optimizer fused into backward):
    from the accumulate hooks, and from inside reversible stacks through their gradient
    sink, as :func:`revffn_fx.training.fuse_optimizer` does."""
    def drop(p: torch.Tensor) -> None:
        p.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop) for p in params if p.requires_grad]
    options = getattr(module, "options", None)
    if options is not None:
        options.grad_sink = lambda p, g: None
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        if options is not None:
            options.grad_sink = None


def _measure_memory(runner: _Runner, ids: torch.Tensor, row: Measurement,
                    device: Any) -> None:
    import torch

    from revffn_fx.tools.measure_memory import peak_live_bytes, saved_tensor_bytes

    row.param_bytes = sum(p.numel() * p.element_size() for p in runner.params)
    with runner.active():
        runner.zero()
        saved, loss = saved_tensor_bytes(lambda: runner.forward(ids))
        loss.backward()
        row.saved_bytes, row.loss = saved, float(loss.detach())
        del loss
        runner.zero()
        gc.collect()
        row.peak_bytes = peak_live_bytes(lambda: runner.step(ids), baseline=runner.params)[0]
        runner.zero()
        with _grads_freed_on_arrival(runner.params, runner.module):
            row.peak_fused_bytes = peak_live_bytes(lambda: runner.step(ids),
                                                   baseline=runner.params)[0]
        runner.zero()
        if device.type == "cuda":
            gc.collect()
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            runner.step(ids)
            _sync(device)
            row.cuda_max_allocated = int(torch.cuda.max_memory_allocated(device))
            runner.zero()


def run_bench(factory: Callable[[int], nn.Module] | str | os.PathLike[str],
              depths: Sequence[int] = (4, 8, 16, 32), batch: int = 4, seq: int = 256,
              methods: Sequence[str] = METHODS, repeats: int = 5, warmup: int = 1,
              progress: ProgressFn | None = None, device: str = "cpu",
              dtype: torch.dtype | str | None = None, seed: int = 0,
              memory: bool = True) -> BenchResult:
    """Measure a training step per (depth, method); see the module docstring.

    ``factory``: ``depth -> model`` (e.g. :func:`revffn_fx.tools.bench_models.synthetic_factory`),
    or a local model directory (loaded with :func:`revffn_fx.frontend.loading.load_model`;
    ``depths`` is then the model's own layer count). ``progress(done, total, what)`` is
    called as cells finish.
    ``memory=False`` skips the memory probes (a timing-only run). Times: ``step_s`` is wall
    time, ``cpu_s`` the process CPU time of the step (robust to a loaded machine when
    running on one thread; with several threads it counts every thread).
    A method that fails on a model (e.g. a layer that cannot be converted, out of memory)
    gets a row with ``error`` set instead of figures; RevFFNError when all of them fail.
    """
    import torch

    _check_settings(methods, batch, seq, repeats, warmup)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RevFFNError(f"device {device!r} requested but CUDA is not available")
    label, make, depths = _model_source(factory, depths, dtype)
    depths = sorted({int(d) for d in depths})
    if not depths or depths[0] < 1:
        raise RevFFNError("depths must be positive layer counts")
    run = _Run(label, batch, seq, repeats, warmup, memory, seed, dev, progress,
               len(depths) * len(methods))
    rows: list[Measurement] = []
    dtype_name = "?"
    for depth in depths:
        model = make(depth).to(dev).train()
        dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
        rows += _bench_depth(run, model, depth, methods)
        del model
        gc.collect()
    if all(r.error for r in rows):
        raise RevFFNError(f"every method failed; first error: {rows[0].error}")
    return BenchResult(model=label, batch=batch, seq=seq, dtype=dtype_name, device=str(dev),
                       repeats=repeats, warmup=warmup, methods=list(methods), depths=depths,
                       rows=rows, machine=machine_info(str(dev)))


def _check_settings(methods: Sequence[str], batch: int, seq: int, repeats: int,
                    warmup: int) -> None:
    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(METHODS + EXTRA_METHODS)}")
    if not methods:
        raise RevFFNError("no method to run")
    if batch < 1 or seq < 2 or repeats < 1 or warmup < 0:
        raise RevFFNError(f"need batch >= 1, seq >= 2, repeats >= 1, warmup >= 0 (got batch "
                          f"{batch}, seq {seq}, repeats {repeats}, warmup {warmup})")


def _model_source(factory: Callable[[int], nn.Module] | str | os.PathLike[str],
                  depths: Sequence[int], dtype: torch.dtype | str | None
                  ) -> tuple[str, Callable[[int], nn.Module], Sequence[int]]:
    """(label, depth -> model, depths): a factory as given, or a model directory loaded
    once at its own depth."""
    if callable(factory):
        return getattr(factory, "label", getattr(factory, "__name__", "model")), factory, depths
    from revffn_fx.frontend.loading import load_model

    path = str(factory)
    first = load_model(path, dtype=parse_dtype(dtype) if dtype is not None else None).train()
    config = first.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
    if not n:
        raise RevFFNError(f"{path}: config has no num_hidden_layers; cannot tell the depth")

    def make(_depth: int) -> nn.Module:
        return first

    return path, make, [int(n)]


@dataclass
class _Run:
    """The settings of one run_bench call, and its progress count."""

    label: str
    batch: int
    seq: int
    repeats: int
    warmup: int
    memory: bool
    seed: int
    dev: Any
    progress: ProgressFn | None
    total: int
    done: int = 0

    def report(self, what: str) -> None:
        if self.progress:
            self.progress(self.done, self.total, what)


def _bench_depth(run: _Run, model: nn.Module, depth: int,
                 methods: Sequence[str]) -> list[Measurement]:
    """Every method on one model: set up and probed one after the other, then timed
    interleaved; ratios to ``checkpoint``."""
    import torch

    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(run.seed)
    ids = torch.randint(3, vocab, (run.batch, run.seq), generator=gen).to(run.dev)
    rows: list[Measurement] = []
    cells: dict[str, Measurement] = {}
    runners: dict[str, _Runner] = {}
    for m in methods:
        row = Measurement(depth, m)
        cells[m] = row
        rows.append(row)
        runner = _set_up(run, m, model, ids, row)
        if runner is not None:
            runners[m] = runner
        run.done += 1
        run.report(f"{run.label}: {depth} layers, {m} "
                   f"({'memory' if run.memory else 'warm-up'})")
    _time_steps(run, depth, runners, cells, ids)
    ref = cells.get("checkpoint")
    for row in cells.values():
        row.ratio = {k: _ratio(getattr(row, a), getattr(ref, a) if ref else None)
                     for k, a in (("saved", "saved_bytes"), ("peak", "peak_bytes"),
                                  ("peak_fused", "peak_fused_bytes"), ("time", "step_s"),
                                  ("cpu", "cpu_s"))}
    return rows


def _set_up(run: _Run, method: str, model: nn.Module, ids: torch.Tensor,
            row: Measurement) -> _Runner | None:
    """The method's runner after its warm-up steps and memory probes; None, with the
    row's error set, when it fails (a method that fails is a row of the result)."""
    import torch

    try:
        runner = _Runner(method, model)
        with runner.active():
            for _ in range(run.warmup):
                runner.zero()
                runner.step(ids)
        if run.memory:
            _measure_memory(runner, ids, row, run.dev)
        status = getattr(runner.module, "loss_head_status", None)
        if status is not None:
            row.note = f"loss head: {status}"
        return runner
    except torch.OutOfMemoryError:
        row.error = "out of memory"
        gc.collect()
        if run.dev.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as e:  # a method that fails is a row of the result, not a crash
        text = str(e).strip().splitlines()
        row.error = (text[0] if text else "") if isinstance(e, RevFFNError) \
            else f"{type(e).__name__}: {text[0] if text else ''}"
    return None


def _time_steps(run: _Run, depth: int, runners: dict[str, _Runner],
                cells: dict[str, Measurement], ids: torch.Tensor) -> None:
    """The timed steps: methods interleaved, so machine load hits them alike; medians."""
    for k in range(run.repeats):
        if runners:  # the timed steps can take minutes: say so
            run.report(f"{run.label}: {depth} layers, timing {k + 1}/{run.repeats}")
        for m, runner in runners.items():
            with runner.active():
                runner.zero()
                gc.collect()
                _sync(run.dev)
                t0, c0 = time.perf_counter(), time.process_time()
                runner.step(ids)
                _sync(run.dev)
                cells[m].step_times.append(time.perf_counter() - t0)
                cells[m].cpu_times.append(time.process_time() - c0)
            runner.zero()
    for m in runners:
        row = cells[m]
        row.step_s = statistics.median(row.step_times)
        row.cpu_s = statistics.median(row.cpu_times)
        row.tokens_per_s = run.batch * run.seq / row.step_s


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b
