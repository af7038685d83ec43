"""``revffn bench --step``: the peak memory of a whole training step, as a user feels it.

One step = forward, causal-LM loss, backward and the AdamW step, measured after a warm-up
step (so the optimizer states exist), for each method of :data:`STEP_METHODS`:

- ``sft``: the model as it is, every activation kept, AdamW;
- ``ckpt``: transformers' activation checkpointing, AdamW (the paper's baseline);
- ``exact``: ``rf.transform(model, coupling="none")``: the same function, every layer
  checkpointed, the lean loss head, AdamW fused into the backward (the strongest
  non-reversible stack);
- ``revffn`` / ``revnet``: the reversible stacks, the lean head, fused AdamW (full stacks);
- ``<stack>/no-head``, ``<stack>/no-fusion``: one part switched off (the original loss head;
  an ordinary AdamW step after the backward); switching off reversibility is ``exact``;
- every other coupling of :data:`revffn_fx.options.COUPLINGS` as a full stack under its own
  name (``momentum``, ``meft``: with ``exact_streams``, the only setting exact at any depth);
- ``offload``: the exact mode with everything autograd saves outside the recomputed layers
  (the checkpoint boundaries, the loss head's inputs) packed to CPU memory by
  ``torch.autograd.graph.save_on_cpu(pin_memory=True)``: the best non-reversible
  long-context peer. On a CPU-only machine it is a copy within the same memory (not pinned:
  there is no accelerator), so it cannot lower the figure there; ``offload/unpinned`` packs
  with ``tensor.cpu()``, which on the CPU is the tensor itself.

The figure is ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the peak of
``torch.distributed._tools.mem_tracker.MemTracker`` (parameters, gradients, optimizer
states, activations and temporaries at the peak), which ``isolate=True`` cross-checks
against the peak RSS of a separate process per method. Times are the median of timed steps,
given as a ratio to ``ckpt`` in the same run. Every method gets a fresh model with the same
weights (the optimizer changes them).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from revffn_fx.errors import RevFFNError
from revffn_fx.tools.bench_models import build_model
from revffn_fx.tools.machine_info import machine_info
from revffn_fx.tools.step_methods import DEFAULT_STEP_METHODS, STEP_METHODS
from revffn_fx.tools.step_result import StepResult, StepRow

if TYPE_CHECKING:
    import torch
    from torch import nn


# ----------------------------------------------------------------------------------- runner

class _Step:
    """One method set up on its own model: ``step()`` runs forward, loss, backward, AdamW."""

    def __init__(self, method: str, model: nn.Module, lr: float = 1e-5) -> None:
        import torch

        import revffn_fx as rf
        from revffn_fx.training.fused import fuse_optimizer

        spec = STEP_METHODS[method]
        self.spec = spec
        self.model = model
        if spec.coupling is None:
            self.module: Any = model
            if spec.checkpoint:
                model.gradient_checkpointing_enable({"use_reentrant": False})
        else:
            self.module = rf.transform(model, coupling=spec.coupling, loss_head=spec.head,
                                       **dict(spec.transform)).train()
        if spec.fused:
            self.opt: Any = fuse_optimizer(self.module, torch.optim.AdamW, lr=lr)
            self.optimizers = list(self.opt.optimizers.values())
        else:
            params = list(dict.fromkeys(p for p in self.module.parameters()
                                        if p.requires_grad))
            self.opt = torch.optim.AdamW(params, lr=lr)
            self.optimizers = [self.opt]

    def step(self, ids: torch.Tensor) -> float:
        import contextlib

        from torch.autograd.graph import save_on_cpu

        kw = {"use_cache": False} if self.module is self.model else {}
        offload = (save_on_cpu(pin_memory=self.spec.offload == "pinned")
                   if self.spec.offload else contextlib.nullcontext())
        with offload:  # what forward and loss save goes to CPU; backward brings it back
            loss = self.module(ids, labels=ids, **kw).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def head_chunk(self, tokens: int) -> int | None:
        from revffn_fx.runtime.loss import ChunkedLossHead

        for gm in getattr(self.module, "_graphs", {}).values():
            for m in gm.modules():
                if isinstance(m, ChunkedLossHead):
                    return m.chunk_tokens(tokens, m.lm_head.weight.dtype)
        return None

    def close(self) -> None:
        if self.spec.fused:
            self.opt.remove()


def _tracked_step(runner: _Step, ids: torch.Tensor, row: StepRow) -> None:
    """The step under MemTracker: its peak, by category."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    mt.track_external(runner.module, *runner.optimizers)
    with mt:
        row.loss = runner.step(ids)
    snap = mt.get_tracker_snapshot("peak")
    dev = next(iter(snap.values())) if len(snap) == 1 else snap[ids.device]
    by = {str(k).rsplit(".", 1)[-1]: int(v) for k, v in dev.items()}
    row.peak_bytes = by.pop("Total")
    row.parameters = by.pop("PARAM", 0) + by.pop("BUFFER", 0)
    row.gradients = by.pop("GRAD", 0)
    row.optimizer = by.pop("OPT", 0)
    row.activations = sum(by.values())


def _cuda_step(runner: _Step, ids: torch.Tensor, row: StepRow) -> None:
    import torch

    gc.collect()
    torch.cuda.synchronize(ids.device)
    torch.cuda.reset_peak_memory_stats(ids.device)
    row.loss = runner.step(ids)
    torch.cuda.synchronize(ids.device)
    row.peak_bytes = int(torch.cuda.max_memory_allocated(ids.device))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_method(method: str, config: Any, batch: int, seq: int, dtype: Any = None,
                   device: str = "cpu", repeats: int = 2, seed: int = 0,
                   rss: bool = False, warmup_seq: int | None = None,
                   one_step: bool = False) -> StepRow:
    """Build a fresh model, warm up one step, measure one; then ``repeats`` timed steps.

    ``rss``: also the process's peak RSS over the measured step minus its RSS before the
    model was built (meaningful only in a process of its own: :func:`run_step_bench` with
    ``isolate=True``); the measured step then runs without the tracker and a further step
    gives the tracker's figure. ``warmup_seq``: the warm-up step's sequence length (it only
    has to create the optimizer states: a short one saves a long-context run a whole step).
    ``one_step`` (long context): one measured step gives the tracker's figure, the peak RSS
    and the time (CPU time of the tracked step, the tracker's dispatch overhead included)
    when ``repeats`` is 0.
    """
    import torch

    if method not in STEP_METHODS:
        raise RevFFNError(f"unknown method {method!r}; choose from {', '.join(STEP_METHODS)}")
    row = StepRow(method, STEP_METHODS[method].label)
    dev = torch.device(device)
    rss0 = _rss_before_model(config, dtype, seed) if rss else None
    runner = None
    try:
        model = build_model(config, dtype, seed, device)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, int(config.vocab_size), (batch, seq), generator=gen).to(dev)
        runner = _Step(method, model)
        runner.step(ids[:, :warmup_seq] if warmup_seq else ids)  # the optimizer states
        _measure_peak(runner, ids, row, rss0, one_step, repeats)
        row.head_chunk = runner.head_chunk(batch * seq)
        _time_steps(runner, ids, row, repeats)
    except torch.OutOfMemoryError:
        row.error = "out of memory"
    finally:
        if runner is not None:
            runner.close()
        del runner
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _rss_before_model(config: Any, dtype: Any, seed: int) -> int:
    """The process's RSS with the code loaded (modeling module, transform, tracker: not
    the step's) but no model built."""
    import torch.distributed._tools.mem_tracker  # noqa: F401

    import revffn_fx.model  # noqa: F401
    import revffn_fx.training.fused  # noqa: F401

    build_model(config, dtype, seed, "meta")
    gc.collect()
    return _rss_bytes()


def _measure_peak(runner: _Step, ids: torch.Tensor, row: StepRow, rss0: int | None,
                  one_step: bool, repeats: int) -> None:
    """The measured step's peak: CUDA's max allocated, or the tracker's by category (with
    ``rss0``, the peak RSS above it too)."""
    if rss0 is not None and not one_step:
        runner.step(ids)
        row.rss_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    gc.collect()
    if ids.device.type == "cuda":
        _cuda_step(runner, ids, row)
        return
    t0, c0 = time.perf_counter(), time.process_time()
    _tracked_step(runner, ids, row)
    if one_step and not repeats:
        row.step_s, row.cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if rss0 is not None and one_step:
        row.rss_peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                              * 1024 - rss0)


def _time_steps(runner: _Step, ids: torch.Tensor, row: StepRow, repeats: int) -> None:
    """``repeats`` timed steps: the medians of wall and CPU time."""
    import torch

    dev = ids.device
    walls, cpus = [], []
    for _ in range(repeats):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        runner.step(ids)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if walls:
        row.step_s, row.cpu_s = statistics.median(walls), statistics.median(cpus)


def _isolated(method: str, spec: dict[str, Any]) -> StepRow:
    """:func:`measure_method` in a fresh Python process (its own peak RSS)."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "revffn_fx.tools.step_bench",
                           json.dumps({**spec, "method": method})],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return StepRow(method, STEP_METHODS[method].label, error=f"child failed: {tail}")
    return StepRow(**json.loads(proc.stdout.strip().splitlines()[-1]))


def run_step_bench(config: Any, batch: int = 4, seq: int = 1024,
                   methods: Sequence[str] = DEFAULT_STEP_METHODS, dtype: Any = None,
                   device: str = "cpu", repeats: int = 2, seed: int = 0,
                   isolate: bool = False, label: str = "model",
                   progress: Callable[[int, int, str], None] | None = None,
                   warmup_seq: int | None = None, one_step: bool = False) -> StepResult:
    """Measure a whole training step for each method; ratios are to ``ckpt`` (to ``exact``
    when ``ckpt`` is not measured). ``warmup_seq``, ``one_step``: see
    :func:`measure_method` (long-context runs)."""
    import torch

    unknown = [m for m in methods if m not in STEP_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(STEP_METHODS)}")
    if not methods:
        raise RevFFNError("no method to run")
    if batch < 1 or seq < 2 or repeats < 0:
        raise RevFFNError(f"need batch >= 1, seq >= 2, repeats >= 0 (got {batch}, {seq}, "
                          f"{repeats})")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RevFFNError(f"device {device!r} requested but CUDA is not available")
    if isolate and dev.type != "cpu":
        raise RevFFNError("isolate (peak RSS per process) is a CPU cross-check")
    dtype = dtype or torch.float32
    spec = dict(config=config.to_dict(), batch=batch, seq=seq,
                dtype=str(dtype).replace("torch.", ""), device=device, repeats=repeats,
                seed=seed, warmup_seq=warmup_seq, one_step=one_step)
    rows = []
    for k, m in enumerate(methods):
        if progress:
            progress(k, len(methods), m)
        row = (_isolated(m, spec) if isolate else
               measure_method(m, config, batch, seq, dtype, device, repeats, seed,
                              warmup_seq=warmup_seq, one_step=one_step))
        rows.append(row)
    if progress:
        progress(len(methods), len(methods), "done")
    reference = "ckpt" if "ckpt" in methods else "exact" if "exact" in methods else "ckpt"
    ref = next((r for r in rows if r.method == reference and not r.error), None)
    for r in rows:
        r.ratio = {"peak": _ratio(r.peak_bytes, ref and ref.peak_bytes),
                   "rss": _ratio(r.rss_peak_bytes, ref and ref.rss_peak_bytes),
                   "time": _ratio(r.step_s, ref and ref.step_s),
                   "cpu": _ratio(r.cpu_s, ref and ref.cpu_s)}
    if all(r.error for r in rows):
        raise RevFFNError(f"every method failed; first error: {rows[0].error}")
    figure = ("torch.cuda.max_memory_allocated" if dev.type == "cuda"
              else "MemTracker peak (torch.distributed._tools.mem_tracker)")
    return StepResult(model=label, layers=int(config.num_hidden_layers),
                      hidden=int(config.hidden_size), vocab=int(config.vocab_size),
                      batch=batch, seq=seq, dtype=str(dtype).replace("torch.", ""),
                      device=str(dev), figure=figure, repeats=repeats, rows=rows,
                      machine=machine_info(str(dev)), reference=reference)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _child_main(arg: str) -> None:
    """``python -m revffn_fx.tools.step_bench SPEC_JSON``: one method, one JSON line out."""
    import torch
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = json.loads(arg)
    cfg = dict(spec["config"])
    config = CONFIG_MAPPING[cfg.pop("model_type")](**cfg)
    row = measure_method(spec["method"], config, spec["batch"], spec["seq"],
                         getattr(torch, spec["dtype"]), spec["device"], spec["repeats"],
                         spec["seed"], rss=True, warmup_seq=spec.get("warmup_seq"),
                         one_step=spec.get("one_step", False))
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    _child_main(sys.argv[1])
