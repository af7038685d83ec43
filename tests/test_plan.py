"""`revffn plan`: estimated peaks by category against measured training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from zoo import qwen15_moe_config, tiny_model

import revffn_fx as rf
from revffn_fx import cli
from revffn_fx.tools.measure_memory import adamw_step_peak
from revffn_fx.tools.memory_plan import memory_plan, parse_bytes

LABELS = {"checkpoint": "gradient checkpointing", "revffn": "reversible + lean loss head"}


def _measure(name: str, method: str, fused: bool, ids: torch.Tensor, **kw: Any) -> int:
    model = tiny_model(name, **kw).train()
    if method == "checkpoint":
        model.activation_checkpointing_enable({"use_reentrant": False})
        run: Any = model
    else:
        run = rf.transform(model).train()
    return adamw_step_peak(run, ids, fused)["peak"]


CONFIGS = [("mixtral", dict(num_hidden_layers=4, vocab_size=512)),
           ("qwen2_moe", dict(num_hidden_layers=3, vocab_size=512)),
           ("olmoe", dict(num_hidden_layers=3, vocab_size=512))]


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_plan_within_15_percent_of_measured_peaks(name: str, kw: dict) -> None:
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    model = tiny_model(name, **kw)
    rows = {(r.method, r.fused): r.total for r in memory_plan(model.config, 2, 64)}
    for method in ("checkpoint", "revffn"):
        for fused in (False, True):
            measured = _measure(name, method, fused, ids, **kw)
            estimated = rows[(LABELS[method], fused)]
            assert abs(estimated - measured) <= 0.15 * measured, (method, fused, estimated,
                                                                  measured)


def test_fused_reversible_has_the_lowest_planned_peak_at_scale(tmp_path: Any) -> None:
    cfg = qwen15_moe_config()
    rows = memory_plan(cfg, 8, 4096)
    best = min(rows, key=lambda r: r.total)
    assert best.method == "reversible + lean loss head" and best.fused
    cfg.save_pretrained(tmp_path)
    res = CliRunner().invoke(cli.main, ["plan", str(tmp_path), "--gpu-mem", "80GB"])
    assert res.exit_code == 0, res.output
    assert "reversible + lean" in res.output and "GiB" in res.output


def test_plan_bad_input() -> None:
    res = CliRunner().invoke(cli.main, ["plan", "/nonexistent/dir"])
    assert res.exit_code == 2
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"
    res = CliRunner().invoke(cli.main, ["plan", str(example), "--gpu-mem", "lots"])
    assert res.exit_code == 2
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("80GB") == 80 * 10**9
