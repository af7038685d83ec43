"""``revffn bench --step``'s result: one :class:`StepRow` per method in a
:class:`StepResult` (rich table, Markdown, JSON), and :func:`plot_sweep`, a PNG of the
peak against depth or sequence length (matplotlib, an optional dependency, imported when
plotting)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MiB = 2 ** 20


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
