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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from revffn_fx.errors import RevFFNError

if TYPE_CHECKING:
    import torch
    from torch import nn

MiB = 2 ** 20


@dataclass(frozen=True)
class StepMethod:
    """How one method trains: which model, checkpointing, loss head and optimizer."""

    label: str
    coupling: str | None  # None: the original model; "none": the exact mode
    checkpoint: bool  # transformers' activation checkpointing (original model only)
    head: str  # "original" or "chunked"
    fused: bool  # AdamW fused into the backward
    transform: tuple[tuple[str, Any], ...] = ()  # more keywords of rf.transform
    offload: str | None = None  # "pinned" / "unpinned": save_on_cpu around forward and loss


STEP_METHODS: dict[str, StepMethod] = {
    "sft": StepMethod("SFT, no checkpointing", None, False, "original", False),
    "ckpt": StepMethod("SFT + HF checkpointing (baseline)", None, True, "original", False),
    "ckpt+fused": StepMethod("HF checkpointing + fused AdamW", None, True, "original", True),
    "exact": StepMethod("exact mode: checkpointing + lean head + fused AdamW", "none", True,
                        "chunked", True),
    "exact/no-fusion": StepMethod("exact mode, AdamW not fused", "none", True, "chunked",
                                  False),
    "revffn": StepMethod("revffn + lean head + fused AdamW", "revffn", False, "chunked", True),
    "revffn/no-head": StepMethod("revffn, original head", "revffn", False, "original", True),
    "revffn/no-fusion": StepMethod("revffn, AdamW not fused", "revffn", False, "chunked",
                                   False),
    "revnet": StepMethod("revnet + lean head + fused AdamW", "revnet", False, "chunked", True),
    "revnet/no-head": StepMethod("revnet, original head", "revnet", False, "original", True),
    "revnet/no-fusion": StepMethod("revnet, AdamW not fused", "revnet", False, "chunked",
                                   False),
    "offload": StepMethod("exact mode, saved tensors offloaded to pinned CPU memory", "none",
                          True, "chunked", True, offload="pinned"),
    "offload/unpinned": StepMethod("exact mode, saved tensors offloaded (not pinned)", "none",
                                   True, "chunked", True, offload="unpinned"),
}


def _add_couplings() -> None:
    """A full-stack method for every coupling of options.COUPLINGS not listed above (one
    place: a coupling added there is measured here); the scaled ones with exact streams."""
    from revffn_fx.options import COUPLINGS, SCALED_COUPLINGS

    for c in COUPLINGS:
        if c == "none" or c in STEP_METHODS:
            continue
        exact = c in SCALED_COUPLINGS
        STEP_METHODS[c] = StepMethod(
            f"{c}{' (exact streams)' if exact else ''} + lean head + fused AdamW", c, False,
            "chunked", True, (("exact_streams", True),) if exact else ())


_add_couplings()
#: the methods of a long-context comparison: the exact mode, its offloading peer and every
#: coupling's full stack
LONG_METHODS = ("exact", "offload", *(m for m in STEP_METHODS
                                      if STEP_METHODS[m].coupling not in (None, "none")
                                      and "/" not in m))
DEFAULT_STEP_METHODS = ("sft", "ckpt", "exact", "revffn", "revnet", "revffn/no-head",
                        "revffn/no-fusion")

# ------------------------------------------------------------------ presets with real shapes

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)

#: name -> (model_type, overrides of transformers' default config, which for these three is
#: the real model's: Mixtral-8x7B, Qwen1.5-MoE-A2.7B, DeepSeek-V3)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral-shaped": ("mixtral", dict(vocab_size=32000, hidden_size=4096,
                                       intermediate_size=14336, num_attention_heads=32,
                                       num_key_value_heads=8, num_local_experts=8,
                                       num_experts_per_tok=2, num_hidden_layers=32)),
    "qwen1.5-moe-shaped": ("qwen2_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        decoder_sparse_step=1, num_hidden_layers=24)),
    "deepseek-v3-shaped": ("deepseek_v3", dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, num_experts_per_tok=8, n_shared_experts=1,
        first_k_dense_replace=3, n_group=8, topk_group=4, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        num_hidden_layers=61)),
}
_WIDTHS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
           "kv_lora_rank", "q_lora_rank")


def preset_config(name: str, layers: int | None = None, hidden: int | None = None,
                  vocab: int | None = None, max_positions: int = 8192) -> Any:
    """The config of preset ``name``, optionally with fewer ``layers`` and a narrower
    ``hidden`` size: feed-forward and low-rank widths and the head count scale with it (head
    dimensions are kept), the vocabulary and expert counts stay real unless ``vocab``."""
    if name not in PRESETS:
        raise RevFFNError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, real = PRESETS[name]
    kw = {**real, **_IDS, "max_position_embeddings": max_positions}
    if layers is not None:
        if layers < 1:
            raise RevFFNError(f"a model needs at least one layer, got {layers}")
        kw["num_hidden_layers"] = layers
    if hidden is not None and hidden != real["hidden_size"]:
        if hidden < 16 or hidden % 16:
            raise RevFFNError(f"--hidden must be a positive multiple of 16, got {hidden}")
        f = hidden / real["hidden_size"]
        head_dim = real["hidden_size"] // real["num_attention_heads"]
        for key in _WIDTHS:
            if key in kw:
                kw[key] = max(16, round(kw[key] * f / 16) * 16)
        heads = max(1, round(real["num_attention_heads"] * f))
        kv = max(1, round(real["num_key_value_heads"] * f))
        kw.update(hidden_size=hidden, num_attention_heads=heads,
                  num_key_value_heads=kv if heads % kv == 0 else 1)
        if model_type != "deepseek_v3":  # MLA head dims are their own settings
            kw["head_dim"] = head_dim
    if vocab is not None:
        kw["vocab_size"] = vocab
    if kw.get("first_k_dense_replace", 0) >= kw["num_hidden_layers"]:
        kw["first_k_dense_replace"] = max(0, kw["num_hidden_layers"] - 1)
    return CONFIG_MAPPING[model_type](**kw)


def build_model(config: Any, dtype: Any = None, seed: int = 0, device: str = "cpu") -> nn.Module:
    """A random-weight causal LM from ``config`` (fixed seed), in train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from revffn_fx.frontend.registry import facts_for

    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(facts_for(config.model_type).load_kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32, **kw)
    return model.train()


# ---------------------------------------------------------------------------------- results

@dataclass
class StepRow:
    """One method's whole-step peak (bytes) and time."""

    method: str
    label: str
    peak_bytes: int | None = None
    parameters: int | None = None
    gradients: int | None = None
    optimizer: int | None = None
    activations: int | None = None  # activations, temporaries and everything else
    rss_peak_bytes: int | None = None  # isolated process: peak RSS minus RSS before the model
    step_s: float | None = None
    cpu_s: float | None = None
    loss: float | None = None
    head_chunk: int | None = None
    error: str | None = None
    ratio: dict[str, float | None] = field(default_factory=dict)


@dataclass
class StepResult:
    """Every method of one whole-step benchmark, with its settings."""

    model: str
    layers: int
    hidden: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    device: str
    figure: str  # what peak_bytes is
    repeats: int
    rows: list[StepRow]
    machine: dict[str, Any] = field(default_factory=dict)
    reference: str = "ckpt"  # the method the ratios are to

    def get(self, method: str) -> StepRow | None:
        return next((r for r in self.rows if r.method == method), None)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(asdict(self), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepResult:
        rows = [StepRow(**r) for r in d["rows"]]
        return cls(**{**d, "rows": rows})

    def title(self) -> str:
        return (f"{self.model}: {self.layers} layers, hidden {self.hidden}, vocab "
                f"{self.vocab}, batch {self.batch} x seq {self.seq}, {self.dtype}, "
                f"{self.device}; peak = {self.figure}")

    def _headers(self) -> list[str]:
        # CPU: process time (robust on a shared machine with one thread); CUDA: wall time
        ref = self.reference
        heads = ["method", "peak MiB", f"/{ref}", "params", "grads", "optim", "activ.",
                 f"time/{ref}" if self.device.startswith("cuda") else f"CPU time/{ref}"]
        if any(r.rss_peak_bytes for r in self.rows):
            heads.insert(3, "RSS MiB")
        return heads

    def _cells(self, r: StepRow) -> list[str]:
        def mib(v: int | None) -> str:
            return "-" if v is None else f"{v / MiB:,.0f}"

        def x(k: str) -> str:
            v = r.ratio.get(k)
            return "-" if v is None else f"{v:.3f}"

        cells = [r.method, mib(r.peak_bytes), x("peak"), mib(r.parameters),
                 mib(r.gradients), mib(r.optimizer), mib(r.activations),
                 x("time" if self.device.startswith("cuda") else "cpu")]
        if any(q.rss_peak_bytes for q in self.rows):
            cells.insert(3, mib(r.rss_peak_bytes))
        return cells

    def to_markdown(self) -> str:
        """The table in Markdown, with the method labels."""
        heads = self._headers()
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for r in self.rows:
            cells = ([r.method, f"error: {r.error}"] + [""] * (len(heads) - 2) if r.error
                     else self._cells(r))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def table(self) -> Any:
        """A rich table (fits 80 columns)."""
        from rich.table import Table

        table = Table(title=self.title(), title_justify="left")
        for i, h in enumerate(self._headers()):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in self.rows:
            if r.error:
                table.add_row(r.method, f"[red]error: {r.error}[/red]")
            else:
                table.add_row(*self._cells(r))
        return table


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
    rss0 = 0
    if rss:  # load the code first (modeling module, transform, tracker): not the step's
        import torch.distributed._tools.mem_tracker  # noqa: F401

        import revffn_fx.model  # noqa: F401
        import revffn_fx.training.fused  # noqa: F401

        build_model(config, dtype, seed, "meta")
        gc.collect()
        rss0 = _rss_bytes()
    runner = None
    try:
        model = build_model(config, dtype, seed, device)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, int(config.vocab_size), (batch, seq), generator=gen).to(dev)
        runner = _Step(method, model)
        runner.step(ids[:, :warmup_seq] if warmup_seq else ids)  # the optimizer states
        if rss and not one_step:
            runner.step(ids)
            row.rss_peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
        gc.collect()
        if dev.type == "cuda":
            _cuda_step(runner, ids, row)
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            _tracked_step(runner, ids, row)
            if one_step and not repeats:
                row.step_s, row.cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if rss and one_step:
                row.rss_peak_bytes = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                      * 1024 - rss0)
        row.head_chunk = runner.head_chunk(batch * seq)
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

    from revffn_fx.tools.bench import machine_info

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


def plot_sweep(results: Sequence[StepResult], x: str, path: str | os.PathLike[str] | None,
               methods: Sequence[str] | None = None, title: str = "", ax: Any = None) -> None:
    """PNG: peak (MiB) against ``x`` ("layers" or "seq"), one line per method; with
    ``ax``, draw on that matplotlib axis instead (``path`` None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods or dict.fromkeys(r.method for res in results for r in res.rows))
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = sorted((getattr(res, x), row.peak_bytes / MiB) for res in results
                     if (row := res.get(m)) is not None and row.peak_bytes)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel({"layers": "decoder layers", "seq": "sequence length"}.get(x, x))
    ax.set_ylabel("peak of a training step (MiB)")
    ax.set_xscale("log", base=2)
    xs = sorted({getattr(res, x) for res in results})
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or (results[0].title() if results else ""), fontsize=8)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)


def source_config(model_dir: str | None, synthetic: str | None, layers: int | None,
                  hidden: int | None = None, vocab: int | None = None,
                  max_positions: int = 8192) -> tuple[Any, str]:
    """(config, label) for ``bench --step``: a local model directory's config (weights are
    not read: random weights have the same memory), a preset, or a bench synthetic model."""
    from revffn_fx.tools.bench import SYNTHETIC, synthetic_config

    if model_dir is not None:
        if not (Path(model_dir) / "config.json").is_file():
            raise RevFFNError(f"{model_dir}: not a model directory (no config.json)")
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RevFFNError(f"{model_dir}: cannot read its config: "
                              f"{str(e).splitlines()[0]}") from None
        if layers is not None:
            config.num_hidden_layers = layers
        if vocab is not None:
            config.vocab_size = vocab
        return config, model_dir
    assert synthetic is not None
    if synthetic in PRESETS:
        return preset_config(synthetic, layers, hidden, vocab, max_positions), synthetic
    if synthetic in SYNTHETIC:
        config = synthetic_config(synthetic, layers or 4)
        if vocab is not None:
            config.vocab_size = vocab
        return config, synthetic
    raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                      f"{', '.join([*PRESETS, *SYNTHETIC])}")


def _progress(done: int, total: int, what: str) -> None:
    """One line per method on stderr (stdout keeps the table)."""
    print(f"bench --step: {done}/{total} {what}", file=sys.stderr, flush=True)


def step_command(model_dir: str | None, synthetic: str | None, layers: str, batch: int,
                 seq: int, repeats: int, methods: str | None, device: str, dtype: str,
                 threads: int | None, json_path: str | None, plot_path: str | None,
                 hidden: int | None, vocab: int | None, isolate: bool) -> None:
    """``revffn bench --step``: one table per depth; JSON and a peak-vs-depth plot."""
    import warnings

    from rich.console import Console

    from revffn_fx.tools.bench import _dtype, _parse_depths

    wanted = [m.strip() for m in (methods or ",".join(DEFAULT_STEP_METHODS)).split(",")
              if m.strip()]
    unknown = [m for m in wanted if m not in STEP_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(STEP_METHODS)}")
    depths: list[int | None] = [None] if model_dir is not None else _parse_depths(layers)
    # the cheap checks before torch and transformers are imported
    from revffn_fx.tools.bench import SYNTHETIC

    if synthetic is not None and synthetic not in PRESETS and synthetic not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                          f"{', '.join([*PRESETS, *SYNTHETIC])}")
    if hidden is not None and (hidden < 16 or hidden % 16):
        raise RevFFNError(f"--hidden must be a positive multiple of 16, got {hidden}")
    torch_dtype = _dtype(dtype)
    import torch

    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*traceable wrapper-subclass.*")
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*")
    results = []
    for depth in depths:
        config, label = source_config(model_dir, synthetic, depth, hidden, vocab,
                                      max(8192, seq))
        results.append(run_step_bench(config, batch, seq, wanted, torch_dtype, device,
                                      repeats, isolate=isolate, label=label,
                                      progress=_progress))
    width = None if sys.stdout.isatty() else 80
    console = Console(width=width, highlight=False)
    for res in results:
        console.print(res.table())
        for r in res.rows:
            if not r.error:
                console.print(f"  {r.method}: {r.label}", highlight=False)
    if json_path:
        Path(json_path).write_text(json.dumps({"results": [asdict(r) for r in results]},
                                              indent=2) + "\n")
    if plot_path:
        plot_sweep(results, "layers", plot_path)


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
