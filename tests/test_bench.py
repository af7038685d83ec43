"""``revffn bench`` on a tiny synthetic model, its bad input, and the memory estimator
against the probe (within 15% on three configs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from revffn_fx.cli_bench import bench_command
from revffn_fx.tools.bench import METHODS
from revffn_fx.tools.bench_models import build, synthetic_config
from revffn_fx.tools.estimate_memory import estimate, estimate_saved_bytes
from revffn_fx.tools.measure_memory import saved_tensor_bytes

FIELDS = ("saved_bytes", "peak_bytes", "peak_fused_bytes", "param_bytes", "step_s", "cpu_s",
          "tokens_per_s", "ratio")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Timing-free tests run on one thread: no oversubscription on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _command() -> Any:
    """The ``bench`` command on ``revffn``'s group when registered there, else on its own."""
    try:
        from revffn_fx.cli import main
    except ImportError:
        return bench_command, []
    return (main, ["bench"]) if "bench" in main.commands else (bench_command, [])


def _run(*args: str) -> Any:
    cmd, prefix = _command()
    return CliRunner().invoke(cmd, [*prefix, *args])


@pytest.mark.slow
def test_bench_tiny_writes_json_and_png(tmp_path: Path) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    r = _run("--synthetic", "tiny", "--layers", "1,2", "--batch", "1", "--seq", "8",
             "--repeats", "1", "--json", str(out), "--plot", str(png))
    assert r.exit_code == 0, r.output
    assert "checkpoint" in r.stdout and "revffn" in r.stdout
    data = json.loads(out.read_text())
    assert data["depths"] == [1, 2] and data["methods"] == list(METHODS)
    cells = {(row["depth"], row["method"]): row for row in data["rows"]}
    assert set(cells) == {(d, m) for d in (1, 2) for m in METHODS}
    for row in cells.values():
        assert row["error"] is None, row
        for f in FIELDS:
            assert row[f] is not None, (f, row)
        assert row["saved_bytes"] > 0 and row["peak_bytes"] > row["param_bytes"]
        assert set(row["ratio"]) == {"saved", "peak", "peak_fused", "time", "cpu"}
    for d in (1, 2):
        assert cells[(d, "checkpoint")]["ratio"]["saved"] == 1.0
        # the same model, the same inputs: checkpointing changes memory, not the loss
        assert cells[(d, "checkpoint")]["loss"] == pytest.approx(cells[(d, "none")]["loss"],
                                                                 rel=1e-5)
    assert cells[(2, "none")]["saved_bytes"] > cells[(2, "checkpoint")]["saved_bytes"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, needle", [
    (("--synthetic", "nope"), "unknown synthetic model"),
    ((), "exactly one"),
    (("some/dir", "--synthetic", "tiny"), "exactly one"),
    (("--synthetic", "tiny", "--layers", "a,b"), "bad --layers"),
    (("--synthetic", "tiny", "--methods", "none,magic"), "unknown method"),
    (("/no/such/model-dir",), "no such directory"),
])
def test_bench_bad_input_exits_2_with_one_line(args: tuple[str, ...], needle: str) -> None:
    r = _run(*args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


@pytest.mark.slow
def test_bench_model_dir_runs_at_its_own_depth(tmp_path: Path) -> None:
    build("tiny", 2).save_pretrained(tmp_path / "m")
    out = tmp_path / "o.json"
    r = _run(str(tmp_path / "m"), "--layers", "7", "--batch", "1", "--seq", "8",
             "--repeats", "1", "--methods", "checkpoint,revffn", "--json", str(out))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["depths"] == [2]
    assert [row["method"] for row in data["rows"]] == ["checkpoint", "revffn"]


# ------------------------------------------------------------------------------- estimator

CASES = [("tiny", 2, 2, 32), ("mixtral-like", 1, 2, 64), ("mixtral-like", 3, 2, 64),
         ("qwen2-moe-like", 2, 2, 64)]


@pytest.mark.parametrize("name, layers, batch, seq", CASES)
def test_estimate_within_15_percent_of_probe(name: str, layers: int, batch: int,
                                             seq: int) -> None:
    from revffn_fx.tools.bench import _Runner

    model = build(name, layers)
    config = synthetic_config(name, layers)
    ids = torch.randint(3, config.vocab_size, (batch, seq),
                        generator=torch.Generator().manual_seed(0))
    methods = ("checkpoint", "revffn", "revnet") + (("none",) if name != "tiny" else ())
    for method in methods:
        runner = _Runner(method, model)
        with runner.active():
            measured, loss = saved_tensor_bytes(lambda r=runner: r.forward(ids))
        del loss
        est = estimate_saved_bytes(config, batch, seq, method)
        assert abs(est - measured) <= 0.15 * measured, (name, layers, method, est, measured)


def test_estimate_grows_with_depth_only_where_it_should() -> None:
    small, big = synthetic_config("mixtral-like", 4), synthetic_config("mixtral-like", 32)
    for method in ("revffn", "revnet"):
        assert estimate_saved_bytes(small, 4, 256, method) == \
            estimate_saved_bytes(big, 4, 256, method)
    ck4 = estimate_saved_bytes(small, 4, 256, "checkpoint")
    ck32 = estimate_saved_bytes(big, 4, 256, "checkpoint")
    assert ck32 - ck4 == 28 * 4 * 256 * 256 * 4  # one fp32 boundary per extra layer
    parts = estimate(small, 4, 256, "none", dtype="bfloat16").parts
    assert parts["head input + fp32 log-softmax"] == 4 * 256 * (256 * 2 + 1024 * 4)
    with pytest.raises(ValueError, match="unknown method"):
        estimate(small, 1, 8, "magic")


# -- the long-context methods of bench --step (issue 30) --------------------------------------

def test_step_methods_cover_every_coupling_and_the_offloading_peer() -> None:
    from revffn_fx.options import COUPLINGS
    from revffn_fx.tools.step_methods import LONG_METHODS, STEP_METHODS

    # a coupling added to options.COUPLINGS is a full-stack method without another edit
    assert {STEP_METHODS[m].coupling for m in LONG_METHODS} >= set(COUPLINGS)
    assert STEP_METHODS["offload"].coupling == "none" and STEP_METHODS["offload"].offload
    assert dict(STEP_METHODS["momentum"].transform).get("exact_streams") is True


@pytest.mark.slow
def test_offload_is_the_exact_mode_with_saved_tensors_on_the_host() -> None:
    from revffn_fx.tools.bench_models import preset_config
    from revffn_fx.tools.step_bench import run_step_bench

    config = preset_config("mixtral-shaped", layers=2, hidden=64, vocab=512)
    res = run_step_bench(config, batch=1, seq=64, repeats=0, warmup_seq=8, one_step=True,
                         methods=["exact", "offload", "offload/unpinned"])
    rows = {r.method: r for r in res.rows}
    assert not [r.error for r in res.rows if r.error] and res.reference == "exact"
    # the same function and the same step: offloading only moves what autograd saves
    assert rows["offload"].loss == rows["exact"].loss == rows["offload/unpinned"].loss
    # on a CPU-only machine the host is where the tensors already are: no memory gained
    # (unpinned packs the tensor itself; pinned packs a copy, the original freed with it)
    for m in ("offload", "offload/unpinned"):
        assert abs(rows[m].peak_bytes / rows["exact"].peak_bytes - 1) < 0.05, m
        assert rows[m].cpu_s is not None
    assert "/exact" in res.to_markdown()
