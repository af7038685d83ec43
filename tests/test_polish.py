"""What a new user sees first: figures that are right, tables that fit 80 columns, progress in
a pipe, every script's --help, fast answers to bad input, short reprs (issue #21)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console
from zoo import qwen15_moe_config

import revffn_fx as rf
from revffn_fx import cli
from revffn_fx.output import human_bytes, progress_reporter
from revffn_fx.tools.bench_result import BenchResult, Measurement

ROOT = Path(__file__).resolve().parents[1]
STDLIB = ROOT / "examples" / "tiny-moe-stdlib"  # tied embeddings: 3,871,872 parameters
MIXTRAL = ROOT / "examples" / "tiny-mixtral"
STDLIB_PARAMS = 3_871_872


# ----------------------------------------------------------------------------- the figures

def test_activation_estimate_follows_layers_and_agrees_with_plan(tmp_path: Path) -> None:
    from revffn_fx.frontend.loading import load_config
    from revffn_fx.tools.memory_plan import memory_plan

    config = load_config(STDLIB)
    seen = {}
    for layers in ("0", "0-1", None):
        s = rf.transform_dir(STDLIB, tmp_path / "out", layers=layers, dry_run=True,
                             estimate_batch=4, estimate_seq=512)
        batch, seq, before, after = s.activation_estimate
        assert (batch, seq) == (4, 512)
        assert any("assuming batch 4 x seq 512" in line for line in s.lines())
        rows = {(r.method, r.fused): r for r in memory_plan(
            config, 4, 512, layers=None if layers is None else s.converted)}
        plain = rows[("plain fine-tuning", False)]
        lean = rows[("reversible + lean loss head", False)]
        assert before == plain.activations + plain.loss_head  # the planner's accounting
        assert after == lean.activations + lean.loss_head
        seen[layers] = (before, after)
    assert len({b for b, _ in seen.values()}) == 1  # plain does not depend on --layers
    # converting more layers keeps less: the estimate honours the selection
    assert seen["0"][1] > seen["0-1"][1] > seen[None][1]


def test_tied_embeddings_counted_once(tmp_path: Path) -> None:
    model = rf.load_model(STDLIB)
    assert sum(p.numel() for p in model.parameters()) == STDLIB_PARAMS
    s = rf.transform_dir(STDLIB, tmp_path / "rev", layers="0")
    assert s.params_before == STDLIB_PARAMS
    assert f"{STDLIB_PARAMS:,} parameters" in s.lines()[0]
    assert f"parameters added: {s.params_added:,} " \
        f"({100 * s.params_added / STDLIB_PARAMS:.2f}%)" in "\n".join(s.lines())
    config = json.loads((tmp_path / "rev" / "config.json").read_text())
    assert config["revffn"]["parameters"]["original"] == STDLIB_PARAMS
    assert f"of {STDLIB_PARAMS:,})" in (tmp_path / "rev" / "README.md").read_text()


def _figures(text: str) -> list[str]:
    return re.findall(r"\d[\d.,]* (?:B|KiB|MiB|GiB|TiB)\b", text)


@pytest.mark.parametrize("wide", [False, True])
def test_plan_has_no_zero_rows(wide: bool) -> None:
    args = ["plan", str(MIXTRAL)] + (["--wide"] if wide else [])
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    figures = _figures(res.output)
    rows = [ln for ln in res.output.splitlines() if ln.rstrip().endswith((" yes", " no"))]
    dashes = sum(ln.split().count("-") for ln in rows)  # a category not held at the peak
    in_rows = len(_figures("\n".join(rows)))  # the notes below the table have figures too
    assert len(rows) >= 8 and in_rows + dashes == len(rows) * (8 if wide else 3), \
        res.output
    assert "0.00" not in res.output
    for f in figures:  # at most three digits before the point, never zero (0.98 GiB at least)
        number = float(f.split()[0])
        assert 0.97 < number < 1000, f


def test_human_bytes() -> None:
    assert human_bytes(0) == "0 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(505 * 2**20) == "505 MiB"
    assert human_bytes(1011 * 2**20) == "0.99 GiB"
    assert human_bytes(15.5 * 2**30) == "15.5 GiB"


# --------------------------------------------------------------------------- 80 columns

def _render(renderable: object, width: int = 80) -> str:
    buf = io.StringIO()
    Console(file=buf, width=width, highlight=False, color_system=None).print(renderable)
    return buf.getvalue()


def _assert_fits(text: str, cells: list[str], width: int = 80) -> None:
    assert "…" not in text and "..." not in text, text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width, text
    for cell in cells:
        assert cell in text, (cell, text)


def _bench_result(device: str = "cpu") -> BenchResult:
    rows = []
    for depth in (4, 32):
        for m in ("none", "checkpoint", "revffn", "revnet", "revffn-cross"):
            rows.append(Measurement(
                depth, m, saved_bytes=123456789 * depth, peak_bytes=234567890 * depth,
                peak_fused_bytes=134567890 * depth, step_s=12.345, cpu_s=23.456,
                tokens_per_s=12345.6, cuda_max_allocated=345678901 * depth,
                ratio={k: 1.234 for k in ("saved", "peak", "peak_fused", "time", "cpu")}))
    rows.append(Measurement(64, "revnet", error="out of memory on a very long error message "
                                                "that would never fit in a table cell"))
    return BenchResult("mixtral-like", 4, 256, "float32", device, 5, 1,
                       ["none", "checkpoint", "revffn", "revnet", "revffn-cross"], [4, 32, 64],
                       rows)


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_bench_table_fits_80_columns(device: str) -> None:
    result = _bench_result(device)
    text = _render(result.table())
    cells = [c for r in result.rows if not r.error
             for i, c in enumerate(result._cells(r))
             if result._headers()[i] in BenchResult.NARROW]
    _assert_fits(text, cells + ["revffn-cross", "error"])
    assert result.errors() == ["revnet at 64 layers: error: out of memory on a very long "
                               "error message that would never fit in a table cell"]
    wide = _render(result.table(wide=True), width=200)
    _assert_fits(wide, [c for r in result.rows if not r.error for c in result._cells(r)],
                 width=200)


def test_plan_table_fits_80_columns(tmp_path: Path) -> None:
    from revffn_fx.tools.memory_plan import memory_plan

    # a big model: figures in GiB with the budget saying no
    cfg = qwen15_moe_config()
    rows = memory_plan(cfg, 8, 4096)
    text = _render(cli.plan_table(rows, "qwen: batch 8 x seq 4096; fits: in 100GB",
                                  100 * 10**9))
    cells = ["reversible + lean head", "checkpointing", "ordinary", "fused", "yes", "no"]
    cells += [human_bytes(r.total) for r in rows]
    _assert_fits(text, cells)
    # the command itself, in a pipe: 80 columns too, method names whole
    cfg.save_pretrained(tmp_path)
    res = CliRunner().invoke(cli.main, ["plan", str(tmp_path), "--gpu-mem", "24GiB"])
    assert res.exit_code == 0, res.output
    _assert_fits(res.output, ["plain", "reversible + lean head", "fits: in 24GiB"])


# ---------------------------------------------------------------------------- progress

def test_progress_lines_when_not_a_terminal() -> None:
    buf = io.StringIO()  # not a terminal
    with progress_reporter("bench", stream=buf) as progress:
        progress(1, 3, "tiny: 2 layers, none (memory)")
        progress(3, 3, "tiny: 2 layers, revnet (memory)")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"bench: 1/3 tiny: 2 layers, none \(memory\) \(\d+s\)", lines[0])
    assert lines[1].startswith("bench: 3/3 tiny: 2 layers, revnet")


def test_transform_progress_lines_in_a_pipe(tmp_path: Path) -> None:
    # CliRunner's stdout and stderr are not terminals: the same path as `... | tee log`
    res = CliRunner().invoke(cli.main, ["transform", str(MIXTRAL), str(tmp_path / "rev")])
    assert res.exit_code == 0, res.stderr
    assert re.search(r"^shards: 1/1 model.safetensors \(\d+s\)$", res.stderr, re.M), res.stderr
    assert "shards:" not in res.stdout  # stdout keeps only the report


def test_bench_progress_lines_in_a_pipe() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--synthetic", "tiny", "--layers", "1",
                                        "--methods", "checkpoint", "--repeats", "1",
                                        "--no-memory", "--batch", "1", "--seq", "8"])
    assert res.exit_code == 0, res.stderr
    lines = res.stderr.splitlines()
    assert re.fullmatch(r"bench: 1/1 tiny: 1 layers, checkpoint \(warm-up\) \(\d+s\)",
                        lines[0]), res.stderr
    assert lines[1].startswith("bench: 1/1 tiny: 1 layers, timing 1/1")
    assert "checkpoint" in res.stdout and "bench:" not in res.stdout


# ------------------------------------------------------------------ bad input, answered fast

@pytest.mark.parametrize("args", [
    ["diff", str(MIXTRAL), "--coupling", "foo"],
    ["diff", "/nonexistent/model"],
    ["plan", str(MIXTRAL), "--gpu-mem", "lots"],
    ["transform", str(MIXTRAL), "/tmp/never-written", "--layers", "x-y"],
    ["bench", "--synthetic", "nope"],
    ["inspect", str(ROOT / "README.md")],
])
def test_bad_input_answered_before_heavy_imports(args: list[str]) -> None:
    code = ("import sys; from revffn_fx.cli import main\n"
            "try:\n    main(sys.argv[1:])\nfinally:\n"
            "    assert 'torch' not in sys.modules, 'torch was imported'\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=60)
    took = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert took < 3.0, took  # no torch import: about 0.2 s on an idle machine


# ----------------------------------------------------------------------------- --help

SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))


def _arguments(help_text: str) -> list[tuple[str, str]]:
    """argparse's arguments, positional and optional: (the name with its metavar, help)."""
    items: list[list[str]] = []
    for line in help_text.splitlines():
        m = re.match(r"^  (\S.*?)(?:\s{2,}(.*))?$", line)
        if m and not line.startswith("   "):
            items.append([m.group(1), m.group(2) or ""])
        elif items and line.startswith("    "):
            items[-1][1] += " " + line.strip()
    return [(a, b.strip()) for a, b in items]


_RUNNER = """
import contextlib, io, json, os, runpy, sys
results = {}
for path, cwd, *args in json.loads(sys.argv[1]):
    os.chdir(cwd)
    sys.argv = [path, *args]
    sys.path.insert(0, os.path.dirname(path))
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        code, err = -1, io.StringIO(f"{type(e).__name__}: {e}")
    sys.path.pop(0)
    results[path + " " + " ".join(args)] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


def _run_scripts(runs: list[list[str]]) -> dict[str, tuple[int, str, str]]:
    """Run scripts as ``python SCRIPT ARGS`` would, in one process (torch imported once:
    seconds instead of a minute), each in its own working directory."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(runs)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_every_script_answers_help_without_side_effects(tmp_path: Path) -> None:
    before = {p: sorted(x.name for x in p.iterdir()) for p in (ROOT / "benchmarks",
                                                                ROOT / "examples")}
    runs, cwds = [], {}
    for script in SCRIPTS:
        cwd = tmp_path / script.stem
        cwd.mkdir()
        cwds[str(script)] = cwd
        runs.append([str(script), str(cwd), "--help"])
    # and pretrain_tiny_moe.py refuses a non-empty --out-dir before any work
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.json").write_text("{}")
    pretrain = str(ROOT / "examples" / "pretrain_tiny_moe.py")
    runs.append([pretrain, str(tmp_path), "--out-dir", str(full)])
    results = _run_scripts(runs)
    code, _, err = results[f"{pretrain} --out-dir {full}"]
    assert code == 2 and "--force" in err, err
    assert (full / "config.json").read_text() == "{}"
    for script in SCRIPTS:
        code, out, err = results[f"{script} --help"]
        cwd = cwds[str(script)]
        assert code == 0, (script.name, err[-500:])
        assert out.startswith("usage:"), (script.name, out[:200])
        assert list(cwd.iterdir()) == [], (script.name, list(cwd.iterdir()))
        for name, text in _arguments(out.split("usage:", 1)[1].split("\n\n", 1)[1]):
            if name.startswith("-h, --help"):
                continue
            assert text, f"{script.name}: {name} has no help text"
            takes_value = bool(re.match(r"^--?[\w-]+(, --?[\w-]+)? [A-Z_]", name))
            assert not takes_value or "(default:" in text, \
                f"{script.name}: {name} does not show its default"
    for folder, names in before.items():  # nothing written beside the scripts either
        new = {x.name for x in folder.iterdir()} - set(names)
        assert not {n for n in new if not n.endswith(".py")}, new  # (.py: someone's new script)


def test_bench_help_documents_every_option() -> None:
    res = CliRunner().invoke(cli.main, ["bench", "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for opt, default in (("--batch", "4"), ("--seq", "256"), ("--warmup", "1")):
        m = re.search(re.escape(opt) + r" INTEGER (.*?)\[default: (\d+)\]", text)
        assert m and m.group(1).strip() and m.group(2) == default, opt


# ------------------------------------------------------------------------------ the API

def test_public_names_only() -> None:
    names = dir(rf)
    for private in ("Any", "TYPE_CHECKING", "annotations", "import_module"):
        assert private not in names
    assert set(rf.__all__) <= set(names) and "__version__" in names


def test_short_reprs() -> None:
    import torch

    model = rf.load_model(MIXTRAL)
    traced = rf.trace(model)
    plan = rf.analyze(traced)
    assert repr(plan) == "Plan(mixtral, 4 layers: 4 convertible; attention 4, moe 4)"
    assert str(plan).splitlines()[1] == (
        "  0 model.layers.0: attention (pre_norm), moe (pre_norm): convertible")
    assert repr(plan.layers[0]).startswith("LayerPlan(0 model.layers.0: attention")
    rev = rf.transform(model, layers="0-1")
    assert repr(rev) == ("RevModel(mixtral, revffn: layers 0-1 of 4 reversible, "
                         f"{sum(p.numel() for p in rev.parameters()):,} parameters, "
                         "loss head chunked)")
    report = rf.verify(rev, torch.randint(0, 256, (1, 8)))
    assert repr(report) == f"VerifyReport({report.summary()})"
    assert len(str(report).splitlines()) == 1 + len(report.layers)
    d = rf.diff(traced.layers[0].graph_module, rev.specs()[0].forward)
    assert repr(d).startswith("GraphDiff(") and d.summary() in repr(d)
    assert "\n" not in repr(d) and str(d) == d.to_text()


def test_shell_scripts_answer_help_without_running(tmp_path: Path) -> None:
    """benchmarks/*.sh print their header on --help and exit 0, writing nothing (they would
    otherwise start GPU runs, or fail for want of a GPU)."""
    for script in sorted((ROOT / "benchmarks").glob("*.sh")):
        env = {**os.environ, "OUT": str(tmp_path / "out")}
        proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                              timeout=30, env=env, cwd=tmp_path)
        assert proc.returncode == 0, (script.name, proc.stderr)
        assert "bash benchmarks/" in proc.stdout and "set -uo" not in proc.stdout, proc.stdout
        assert list(tmp_path.iterdir()) == [], (script.name, list(tmp_path.iterdir()))
