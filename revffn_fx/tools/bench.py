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
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from revffn_fx.errors import RevFFNError
from revffn_fx.exits import Command  # the exit statuses of every revffn command

if TYPE_CHECKING:
    import torch
    from rich.table import Table
    from torch import nn

METHODS: tuple[str, ...] = ("none", "checkpoint", "revffn", "revnet")
EXTRA_METHODS: tuple[str, ...] = ("revffn-cross",)
MiB = 2 ** 20
ProgressFn = Callable[[int, int, str], None]

# ------------------------------------------------------------------------ synthetic models

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            max_position_embeddings=4096)

#: name -> (model_type, config keyword arguments without the layer count).
SYNTHETIC: dict[str, tuple[str, dict[str, Any]]] = {
    # the reference config of docs/benchmarks.md
    "mixtral-like": ("mixtral", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, **_IDS)),
    # Qwen1.5-MoE shape: many small experts, top-4, plus a gated shared expert
    "qwen2-moe-like": ("qwen2_moe", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=8, num_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, shared_expert_intermediate_size=512,
        decoder_sparse_step=1, **_IDS)),
    # DeepSeek-V3 shape: MLA attention, routed + shared experts, the first layer dense
    "deepseek-v3-like": ("deepseek_v3", dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4,
        topk_group=2, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, **_IDS)),
    # for tests: seconds on a CPU
    "tiny": ("mixtral", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **_IDS)),
}


def synthetic_config(name: str, layers: int) -> Any:
    """The config object of the synthetic model ``name`` with ``layers`` decoder layers."""
    if name not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {name!r}; choose from "
                          f"{', '.join(SYNTHETIC)}")
    if layers < 1:
        raise RevFFNError(f"a model needs at least one layer, got {layers}")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type, kw = SYNTHETIC[name]
    return CONFIG_MAPPING[model_type](num_hidden_layers=layers, **kw)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    import torch

    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if not isinstance(value, torch.dtype):
            raise RevFFNError(f"unknown dtype {dtype!r}; use e.g. float32 or bfloat16")
        return value
    return dtype


def build(name: str, layers: int, dtype: torch.dtype | str | None = None,
          seed: int = 0) -> nn.Module:
    """A random-weight synthetic causal LM (``AutoModelForCausalLM.from_config``), train mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from revffn_fx.frontend.registry import facts_for

    config = synthetic_config(name, layers)
    torch.manual_seed(seed)
    kw: dict[str, Any] = dict(facts_for(config.model_type).load_kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype), **kw)
    return model.train()


def synthetic_factory(name: str, dtype: torch.dtype | str | None = None,
                      seed: int = 0) -> Callable[[int], nn.Module]:
    """``depth -> model`` for :func:`run_bench`; checks ``name`` at once."""
    synthetic_config(name, 1)
    factory = lambda depth: build(name, depth, dtype, seed)  # noqa: E731
    factory.label = name  # type: ignore[attr-defined]
    return factory


# ------------------------------------------------------------------------------- results

@dataclass
class Measurement:
    """One (depth, method) cell of a benchmark; bytes are exact, times in seconds."""

    depth: int
    method: str
    saved_bytes: int | None = None
    peak_bytes: int | None = None
    peak_fused_bytes: int | None = None
    param_bytes: int | None = None
    step_s: float | None = None
    step_times: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    cpu_times: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    cuda_max_allocated: int | None = None
    loss: float | None = None
    note: str = ""
    error: str | None = None
    ratio: dict[str, float | None] = field(default_factory=dict)


@dataclass
class BenchResult:
    """Every measurement of one run, with the settings and the machine it ran on."""

    model: str
    batch: int
    seq: int
    dtype: str
    device: str
    repeats: int
    warmup: int
    methods: list[str]
    depths: list[int]
    rows: list[Measurement]
    machine: dict[str, Any] = field(default_factory=dict)

    def get(self, depth: int, method: str) -> Measurement | None:
        return next((r for r in self.rows if r.depth == depth and r.method == method), None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        """The result as JSON; written to ``path`` too when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    # -- rendering ---------------------------------------------------------------------
    def _cells(self, r: Measurement) -> list[str]:
        def mib(v: int | None) -> str:
            return "-" if v is None else f"{v / MiB:.2f}"

        def x(key: str) -> str:
            v = r.ratio.get(key)
            return "-" if v is None else f"{v:.2f}x"

        cells = [str(r.depth), r.method, mib(r.saved_bytes), x("saved"), mib(r.peak_bytes),
                 x("peak"), mib(r.peak_fused_bytes), x("peak_fused"),
                 "-" if r.step_s is None else f"{r.step_s:.3f}", x("time"),
                 "-" if r.cpu_s is None else f"{r.cpu_s:.3f}", x("cpu"),
                 "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"]
        if self.device.startswith("cuda"):
            cells.append(mib(r.cuda_max_allocated))
        return cells

    def _headers(self) -> list[str]:
        heads = ["layers", "method", "saved MiB", "saved/ckpt", "peak MiB", "peak/ckpt",
                 "peak, grads freed MiB", "/ckpt", "step s (median)", "time/ckpt", "CPU s",
                 "CPU/ckpt", "tokens/s"]
        if self.device.startswith("cuda"):
            heads.append("cuda max alloc MiB")
        return heads

    #: the columns of the default (80-column) table, by header; ``wide`` shows all
    NARROW = ("layers", "method", "saved MiB", "peak MiB", "peak, grads freed MiB",
              "step s (median)", "time/ckpt")
    _SHORT = {"peak, grads freed MiB": "fused peak MiB", "step s (median)": "step s"}

    def title(self) -> str:
        return (f"{self.model}: batch {self.batch} x seq {self.seq}, {self.dtype}, "
                f"{self.device}, median of {self.repeats} after {self.warmup} warm-up")

    def table(self, wide: bool = False) -> Table:
        """A rich table: one row per (depth, method); errors in place of figures.

        By default the columns that fit 80 characters (saved and peak bytes, the peak with
        gradients freed as they arrive, the median step time and its ratio to
        checkpointing); ``wide``: every column (all ratios, CPU time, tokens/s, CUDA).
        """
        from rich import box
        from rich.table import Table

        heads = self._headers()
        keep = [i for i, h in enumerate(heads) if wide or h in self.NARROW]
        table = Table(title=self.title(), title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, show_edge=False, collapse_padding=True)
        for i in keep:
            h = heads[i] if wide else self._SHORT.get(heads[i], heads[i])
            table.add_column(h, justify="left" if i == 1 else "right", no_wrap=True)
        for r in self.rows:
            if r.error:  # the message is printed under the table (errors()), whole
                table.add_row(str(r.depth), r.method, "[red]error[/red]")
            else:
                cells = self._cells(r)
                table.add_row(*(cells[i] for i in keep))
        return table

    def errors(self) -> list[str]:
        """One line per failed (depth, method): ``revnet at 4 layers: error: ...``."""
        return [f"{r.method} at {r.depth} layers: error: {r.error}" for r in self.rows
                if r.error]

    def to_markdown(self) -> str:
        """The same table in Markdown."""
        heads = self._headers()
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for r in self.rows:
            cells = ([str(r.depth), r.method, f"error: {r.error}"] + [""] * (len(heads) - 3)
                     if r.error else self._cells(r))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> None:
        """PNG: saved bytes, step peak and time ratio to checkpointing, against depth."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
        panels = (("saved_bytes", "saved for backward (MiB)"),
                  ("peak_bytes", "peak live bytes of a step (MiB)"))
        for ax, (key, label) in zip(axes[:2], panels):
            for m in self.methods:
                pts = [(r.depth, getattr(r, key) / MiB) for r in self.rows
                       if r.method == m and getattr(r, key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xlabel("decoder layers")
            ax.set_ylabel(label)
            if key == "saved_bytes":
                ax.set_yscale("log")  # none is 10-100x the others
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.depths, [str(d) for d in self.depths])
            ax.grid(alpha=0.3)
            ax.legend()
        ax = axes[2]
        width = 0.8 / max(1, len(self.methods))
        for i, m in enumerate(self.methods):
            vals = [(j, r.ratio.get("time")) for j, d in enumerate(self.depths)
                    if (r := self.get(d, m)) is not None]
            vals = [(j, v) for j, v in vals if v is not None]
            if vals:
                xs, ys = zip(*vals)
                ax.bar([x + (i - (len(self.methods) - 1) / 2) * width for x in xs], ys, width,
                       label=m)
        ax.axhline(1.0, color="black", lw=0.8)  # as fast as checkpointing
        ax.set_xticks(range(len(self.depths)), [str(d) for d in self.depths])
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("step time / checkpointing")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        fig.suptitle(self.title(), fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
        plt.close(fig)


# ---------------------------------------------------------------------------------- runner

def machine_info(device: str = "cpu") -> dict[str, Any]:
    """CPU model, cores, threads, torch/transformers versions, and the GPU when used."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = dict(cpu=cpu, cores=os.cpu_count(),
                                torch_threads=torch.get_num_threads(), torch=torch.__version__,
                                transformers=transformers.__version__,
                                python=platform.python_version())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


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

    ``factory``: ``depth -> model`` (e.g. :func:`synthetic_factory`), or a local model
    directory (loaded with :func:`revffn_fx.frontend.loading.load_model`; ``depths`` is then the
    model's own layer count). ``progress(done, total, what)`` is called as cells finish.
    ``memory=False`` skips the memory probes (a timing-only run). Times: ``step_s`` is wall
    time, ``cpu_s`` the process CPU time of the step (robust to a loaded machine when
    running on one thread; with several threads it counts every thread).
    A method that fails on a model (e.g. a layer that cannot be converted, out of memory)
    gets a row with ``error`` set instead of figures; RevFFNError when all of them fail.
    """
    import torch

    unknown = [m for m in methods if m not in METHODS + EXTRA_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(METHODS + EXTRA_METHODS)}")
    if not methods:
        raise RevFFNError("no method to run")
    if batch < 1 or seq < 2 or repeats < 1 or warmup < 0:
        raise RevFFNError(f"need batch >= 1, seq >= 2, repeats >= 1, warmup >= 0 (got batch "
                          f"{batch}, seq {seq}, repeats {repeats}, warmup {warmup})")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RevFFNError(f"device {device!r} requested but CUDA is not available")
    if callable(factory):
        label = getattr(factory, "label", getattr(factory, "__name__", "model"))
        make = factory
    else:
        from revffn_fx.frontend.loading import load_model

        path = str(factory)
        label = path
        first = load_model(path, dtype=_dtype(dtype) if dtype is not None else None).train()
        config = first.config
        n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None)
        if not n:
            raise RevFFNError(f"{path}: config has no num_hidden_layers; cannot tell the depth")
        depths = [int(n)]

        def make(_depth: int) -> nn.Module:
            return first

    depths = sorted({int(d) for d in depths})
    if not depths or depths[0] < 1:
        raise RevFFNError("depths must be positive layer counts")
    rows: list[Measurement] = []
    total = len(depths) * len(methods)
    done = 0
    dtype_name = "?"
    for depth in depths:
        model = make(depth).to(dev).train()
        dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
        vocab = int(model.config.vocab_size)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (batch, seq), generator=gen).to(dev)
        runners: dict[str, _Runner] = {}
        cells: dict[str, Measurement] = {}
        for m in methods:
            row = Measurement(depth, m)
            cells[m] = row
            rows.append(row)
            try:
                runner = _Runner(m, model)
                with runner.active():
                    for _ in range(warmup):
                        runner.zero()
                        runner.step(ids)
                if memory:
                    _measure_memory(runner, ids, row, dev)
                status = getattr(runner.module, "loss_head_status", None)
                if status is not None:
                    row.note = f"loss head: {status}"
                runners[m] = runner
            except torch.OutOfMemoryError:
                row.error = "out of memory"
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # a method that fails is a row of the result, not a crash
                text = str(e).strip().splitlines()
                row.error = (text[0] if text else "") if isinstance(e, RevFFNError) \
                    else f"{type(e).__name__}: {text[0] if text else ''}"
            done += 1
            if progress:
                progress(done, total, f"{label}: {depth} layers, {m} "
                                      f"({'memory' if memory else 'warm-up'})")
        # timing: methods interleaved, so machine load hits them alike
        for k in range(repeats):
            if progress and runners:  # the timed steps can take minutes: say so
                progress(done, total, f"{label}: {depth} layers, timing {k + 1}/{repeats}")
            for m, runner in runners.items():
                with runner.active():
                    runner.zero()
                    gc.collect()
                    _sync(dev)
                    t0, c0 = time.perf_counter(), time.process_time()
                    runner.step(ids)
                    _sync(dev)
                    cells[m].step_times.append(time.perf_counter() - t0)
                    cells[m].cpu_times.append(time.process_time() - c0)
                runner.zero()
        for m in runners:
            row = cells[m]
            row.step_s = statistics.median(row.step_times)
            row.cpu_s = statistics.median(row.cpu_times)
            row.tokens_per_s = batch * seq / row.step_s
        ref = cells.get("checkpoint")
        for row in cells.values():
            row.ratio = {k: _ratio(getattr(row, a), getattr(ref, a) if ref else None)
                         for k, a in (("saved", "saved_bytes"), ("peak", "peak_bytes"),
                                      ("peak_fused", "peak_fused_bytes"), ("time", "step_s"),
                                      ("cpu", "cpu_s"))}
        del runners, model
        gc.collect()
    if all(r.error for r in rows):
        raise RevFFNError(f"every method failed; first error: {rows[0].error}")
    return BenchResult(model=label, batch=batch, seq=seq, dtype=dtype_name, device=str(dev),
                       repeats=repeats, warmup=warmup, methods=list(methods), depths=depths,
                       rows=rows, machine=machine_info(str(dev)))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# -------------------------------------------------------------------------------------- CLI

def _parse_depths(spec: str) -> list[int]:
    try:
        depths = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise RevFFNError(f"bad --layers {spec!r}: use a comma list like 4,8,16,32") from None
    if not depths or min(depths) < 1:
        raise RevFFNError(f"bad --layers {spec!r}: layer counts must be positive")
    return depths


@click.command("bench", cls=Command, short_help="Measure memory and time of a training step.",
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", required=False, type=click.Path(path_type=str))
@click.option("--synthetic", metavar="NAME",
              help=f"A synthetic model with random weights: {', '.join(SYNTHETIC)}.")
@click.option("--layers", default="4,8,16,32", show_default=True, metavar="LIST",
              help="Depths to build synthetic models at (ignored with MODEL_DIR, which runs "
                   "at its own layer count).")
@click.option("--batch", type=int, default=4, show_default=True,
              help="Sequences per training step.")
@click.option("--seq", type=int, default=256, show_default=True,
              help="Tokens per sequence.")
@click.option("--repeats", type=int, default=5, show_default=True,
              help="Timed steps per method (median reported).")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Untimed steps per method before measuring.")
@click.option("--methods", default=",".join(METHODS), show_default=True, metavar="LIST",
              help=f"Methods to compare; also {', '.join(EXTRA_METHODS)}. With --step: "
                   "sft, ckpt, exact, offload (the exact mode with saved tensors in pinned "
                   "host memory), every coupling by name, <coupling>/no-head, /no-fusion "
                   "(revffn_fx.tools.step_bench.STEP_METHODS).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True,
              help="Synthetic models' dtype (MODEL_DIR keeps its own unless given).")
@click.option("--threads", type=int, default=None,
              help="torch.set_num_threads (CPU)  [default: torch's own]")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Run the memory probes (--no-memory: a timing-only run).")
@click.option("--json", "json_path", type=click.Path(path_type=str),
              help="Write every measurement as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(path_type=str),
              help="Write a PNG plot here (needs matplotlib).")
@click.option("--wide", is_flag=True,
              help="Every column (all ratios to checkpointing, CPU time, tokens/s, CUDA "
                   "memory); the default table fits 80 columns.")
@click.option("--step", is_flag=True,
              help="The headline: peak memory of a whole training step with AdamW (SFT, "
                   "checkpointing, exact mode, revffn, revnet and each part switched off); "
                   "also takes the presets mixtral-shaped, qwen1.5-moe-shaped, "
                   "deepseek-v3-shaped.")
@click.option("--hidden", type=int, default=None,
              help="--step: narrow a preset to this hidden size (widths scale with it).")
@click.option("--vocab", type=int, default=None, help="--step: override the vocabulary.")
@click.option("--isolate", is_flag=True,
              help="--step on CPU: each method in its own process, with its peak RSS.")
def bench_command(model_dir: str | None, synthetic: str | None, layers: str, batch: int,
                  seq: int, repeats: int, warmup: int, methods: str, device: str, dtype: str,
                  threads: int | None, memory: bool, json_path: str | None,
                  plot_path: str | None, wide: bool, step: bool = False,
                  hidden: int | None = None, vocab: int | None = None,
                  isolate: bool = False) -> None:
    """Measure a training step: no checkpointing, activation checkpointing, revffn, revnet.

    Give MODEL_DIR (a local Hugging Face model directory) or --synthetic NAME. For each
    depth and method: bytes saved for backward, peak live tensor bytes of the step
    (parameters included), the same peak with gradients freed as they arrive, median step
    time, tokens/s and on CUDA torch.cuda.max_memory_allocated; ratios to checkpointing.
    The table shows the main columns (80 characters); --wide, --json or --plot have all.
    Progress goes to stderr: a bar in a terminal, one line per cell otherwise.

    \b
    Example:
      revffn bench --synthetic mixtral-like --layers 4,8 --json out.json --plot out.png
    """
    if (model_dir is None) == (synthetic is None):
        raise RevFFNError("give either MODEL_DIR or --synthetic NAME (exactly one)")
    if plot_path:
        import importlib.util

        # a missing optional dependency is found before the run, not after it
        if importlib.util.find_spec("matplotlib") is None:
            raise RevFFNError("--plot needs matplotlib: pip install 'revffn-fx[bench]'")
    if step:
        from revffn_fx.tools.step_bench import step_command

        return step_command(model_dir, synthetic, layers, batch, seq, repeats,
                            None if methods == ",".join(METHODS) else methods, device, dtype,
                            threads, json_path, plot_path, hidden, vocab, isolate)
    from revffn_fx.output import check_model_dir

    # the cheap checks before torch and transformers are imported (seconds)
    if synthetic is not None and synthetic not in SYNTHETIC:
        raise RevFFNError(f"unknown synthetic model {synthetic!r}; choose from "
                          f"{', '.join(SYNTHETIC)}")
    if model_dir is not None:
        check_model_dir(model_dir)
    unknown = [m.strip() for m in methods.split(",")
               if m.strip() and m.strip() not in METHODS + EXTRA_METHODS]
    if unknown:
        raise RevFFNError(f"unknown method {unknown[0]!r}; choose from "
                          f"{', '.join(METHODS + EXTRA_METHODS)}")
    if synthetic is not None:
        _parse_depths(layers)
    import torch

    if threads:
        torch.set_num_threads(threads)
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    source: Any
    if synthetic is not None:
        source = synthetic_factory(synthetic, _dtype(dtype))
        depths = _parse_depths(layers)
    else:
        source, depths = model_dir, [0]
    from rich.console import Console

    from revffn_fx.output import progress_reporter

    with progress_reporter("bench") as progress:
        result = run_bench(source, depths, batch, seq, wanted, repeats, warmup, progress,
                           device=device, memory=memory,
                           dtype=dtype if synthetic is None and dtype != "float32" else None)
    width = None if sys.stdout.isatty() else (200 if wide else 80)
    Console(width=width, highlight=False).print(result.table(wide))
    for line in result.errors():
        click.echo(line)
    if json_path:
        result.to_json(json_path)
    if plot_path:
        result.plot(plot_path)
