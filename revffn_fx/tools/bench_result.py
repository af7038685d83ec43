"""``revffn bench``'s result: one :class:`Measurement` per (depth, method) in a
:class:`BenchResult`, rendered as a rich table, Markdown, JSON or a PNG plot (matplotlib,
an optional dependency, imported when plotting)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

MiB = 2 ** 20


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
