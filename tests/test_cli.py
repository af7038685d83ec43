"""The command line: ``revffn`` (inspect, transform, verify) and ``revffn-transform``.

Most tests run the click commands in process (CliRunner); a few run the installed console
scripts in a subprocess, which is what users run. The transform command's wiring (arguments,
progress, errors) is tested against a stub export module; the end-to-end transform tests use
the real ``revffn_fx.export`` when it exists.
"""

from __future__ import annotations

import io
import json
import re
import runpy
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from zoo import tiny_model

import revffn_fx
from revffn_fx import cli
from revffn_fx.errors import ExportError
from revffn_fx.options import TransformOptions

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-mixtral"
BIN = Path(sys.executable).parent


def run(*args: str) -> Any:
    """``revffn ARGS`` in process; stdout and stderr kept apart."""
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (next to this Python) in a subprocess."""
    exe = BIN / name
    if not exe.exists():
        found = shutil.which(name)
        if found is None:
            pytest.fail(f"console script {name} not installed (pip install -e .)")
        exe = Path(found)
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``zoo_dir(name)``: a tiny ``name`` model saved to a directory (built once per module)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            tiny_model(name).save_pretrained(path)
            made[name] = path
        return made[name]

    return get


# -------------------------------------------------------------------------------- console scripts

@pytest.mark.slow
def test_inspect_console_script_example() -> None:
    res = script("revffn", "inspect", str(EXAMPLE))
    assert res.returncode == 0, res.stderr
    assert "4 layers: 4 convertible; attention 4, moe 4" in res.stdout
    assert "decoder layers" in res.stdout and "residual form" in res.stdout
    assert "attention: input_layernorm, self_attn" in res.stdout
    assert "MixtralForCausalLM" in res.stdout
    assert "\x1b[" not in res.stdout  # no colour codes when piped


def test_bad_path_console_script_one_line(tmp_path: Path) -> None:
    res = script("revffn", "inspect", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "no such directory" in lines[0]


def test_transform_console_script_help() -> None:
    res = script("revffn-transform", "--help")
    assert res.returncode == 0
    for word in ("MODEL_DIR OUT_DIR", "--coupling", "--layers", "--verify / --no-verify",
                 "--force", "--dry-run", "--max-shard-size", "Exit status", "Example"):
        assert word in res.stdout, word


def test_python_dash_m(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m revffn_fx`` is ``revffn`` (run in process: runpy, as -m does)."""
    monkeypatch.setattr(sys, "argv", ["revffn", "--version"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("revffn_fx", run_name="__main__")
    assert exit_.value.code == 0
    assert revffn_fx.__version__ in capsys.readouterr().out


# ------------------------------------------------------------------------------------ help, usage

@pytest.mark.parametrize("args", [[], ["transform"], ["inspect"], ["verify"]])
def test_help_every_command(args: list[str]) -> None:
    res = run(*args, "--help")
    assert res.exit_code == 0
    assert "Usage:" in res.stdout and "Exit status" in res.stdout
    assert "Example" in res.stdout
    res = run(*args, "-h")
    assert res.exit_code == 0 and "Usage:" in res.stdout


def test_bare_revffn_shows_help() -> None:
    res = run()
    assert res.exit_code == 0 and "Commands:" in res.stdout and res.stderr == ""


def test_standalone_transform_help() -> None:
    res = CliRunner().invoke(cli.transform_main, ["--help"])
    assert res.exit_code == 0 and "MODEL_DIR OUT_DIR" in res.stdout


def test_version() -> None:
    res = run("--version")
    assert res.exit_code == 0 and revffn_fx.__version__ in res.stdout


@pytest.mark.parametrize("args", [["inspect"], ["inspect", "--bogus", "x"], ["nosuch"],
                                  ["transform", "a", "b", "--coupling", "other"],
                                  ["verify", "x", "--batch", "0"]])
def test_usage_errors_exit_2_one_line(args: list[str]) -> None:
    res = run(*args)
    assert res.exit_code == 2
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "--help" in lines[0]


def test_bug_exits_1_with_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(path: str) -> None:
        raise ValueError("unexpected\nthing")

    monkeypatch.setattr(revffn_fx, "load_model", boom)
    res = run("inspect", str(EXAMPLE))
    assert res.exit_code == 1
    first, hint = res.stderr.splitlines()
    assert first.startswith("error: internal error") and "ValueError: unexpected thing" in first
    assert "REVFFN_DEBUG=1" in hint


# ---------------------------------------------------------------------------------------- inspect

def test_inspect_example() -> None:
    res = run("inspect", str(EXAMPLE))
    assert res.exit_code == 0, res.stderr
    out = res.stdout
    assert out.rstrip().splitlines()[-1] == "4 layers: 4 convertible; attention 4, moe 4"
    for fact in ("model type", "mixtral", "hidden size", "64", "experts", "parameters",
                 "476,736", "float32"):
        assert fact in out, fact
    assert out.count("moe: post_attention_layernorm, mlp") == 4
    assert out.count("pre_norm") == 8
    assert max(len(line) for line in out.splitlines()) <= cli._WIDTH


def test_inspect_json() -> None:
    res = run("inspect", str(EXAMPLE), "--json")
    assert res.exit_code == 0
    data = json.loads(res.stdout)  # JSON only, nothing else on stdout
    assert len(data["layers"]) == 4
    assert data["summary"] == "4 layers: 4 convertible; attention 4, moe 4"
    assert data["model"]["model_type"] == "mixtral"
    assert [s["kind"] for s in data["layers"][0]["sublayers"]] == ["attention", "moe"]
    assert all(layer["convertible"] for layer in data["layers"])


def test_inspect_deepseek_dense_first_layer(zoo_dir: Any) -> None:
    path = zoo_dir("deepseek_v3")
    res = run("inspect", str(path))
    assert res.exit_code == 0, res.stderr
    assert "2 layers: 2 convertible; attention 2, moe 1, mlp 1" in res.stdout
    data = json.loads(run("inspect", str(path), "--json").stdout)
    assert [s["kind"] for s in data["layers"][0]["sublayers"]] == ["attention", "mlp"]
    assert [s["kind"] for s in data["layers"][1]["sublayers"]] == ["attention", "moe"]


def test_inspect_minimax_not_convertible(zoo_dir: Any) -> None:
    path = zoo_dir("minimax")
    res = run("inspect", str(path))
    assert res.exit_code == 0, res.stderr  # inspect reports; it does not fail
    out = res.stdout
    assert "2 layers: 0 convertible" in out
    assert "norm_residual" in out
    assert "no: the residual is taken after" in out
    data = json.loads(run("inspect", str(path), "--json").stdout)
    assert not any(layer["convertible"] for layer in data["layers"])
    assert all("not of the form x + f(x)" in layer["reason"] for layer in data["layers"])


def test_inspect_broken_config_exit_2(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    res = run("inspect", str(tmp_path))
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "config.json" in res.stderr


# ------------------------------------------------------------------------ transform (stub export)

@dataclass
class _Summary:
    text: list[str]

    def lines(self) -> list[str]:
        return self.text


@pytest.fixture
def stub_export(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace ``revffn_fx.export`` with a stub; returns the kwargs of the last call."""
    seen: dict[str, Any] = {}
    mod = types.ModuleType("revffn_fx.export")

    def transform_dir(model_dir: str, out_dir: str, **kw: Any) -> _Summary:
        seen.update(model_dir=model_dir, out_dir=out_dir, **kw)
        if seen.get("raise"):
            raise seen["raise"]
        kw["progress"](1, 2, "model-00001-of-00002.safetensors")
        kw["progress"](2, 2, "model-00002-of-00002.safetensors")
        return _Summary(["converted 4 of 4 layers", "parameters added: 1,024"])

    mod.transform_dir = transform_dir  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "revffn_fx.export", mod)
    monkeypatch.setattr(cli, "_check_model_dir", lambda path: None)  # "in" is no directory
    return seen


def test_transform_passes_options(stub_export: dict[str, Any]) -> None:
    res = run("transform", "in", "out", "--coupling", "revffn", "--layers", "0-1", "--verify",
              "--force", "--dry-run", "--max-shard-size", "10MB", "--attention", "cross",
              "--fixed-point-iters", "80", "--fixed-point-tol", "1e-9", "--calibrate", "c.txt",
              "--calibration-tokens", "512", "--stream-dtype", "float32")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.splitlines() == ["converted 4 of 4 layers", "parameters added: 1,024"]
    progress = stub_export.pop("progress")
    assert callable(progress)
    expected = dict(model_dir="in", out_dir="out", verify=True, force=True, dry_run=True,
                    max_shard_size="10MB", calibrate="c.txt", calibration_tokens=512,
                    estimate_batch=8, estimate_seq=2048)
    assert {k: stub_export.get(k) for k in expected} == expected
    # the transform's options travel as one value, every field from its flag
    assert stub_export["options"] == TransformOptions(
        coupling="revffn", layers=(0, 1), attention="cross", fixed_point_iters=80,
        fixed_point_tol=1e-9, stream_dtype="float32")


def test_transform_refuses_bad_option_combinations_at_once(stub_export: dict[str, Any]) -> None:
    res = run("transform", "in", "out", "--coupling", "revnet", "--attention", "cross")
    assert res.exit_code == 2 and "model_dir" not in stub_export
    assert res.stderr == "error: cross-branch attention is an option of the revffn coupling\n"


def test_transform_defaults_standalone(stub_export: dict[str, Any]) -> None:
    res = CliRunner().invoke(cli.transform_main, ["in", "out"])
    assert res.exit_code == 0, res.stderr
    assert stub_export["options"] == TransformOptions(stream_dtype="auto")
    assert stub_export["verify"] is False and stub_export["force"] is False
    assert stub_export["dry_run"] is False and stub_export["max_shard_size"] == "2GB"
    assert stub_export["calibrate"] is None


def test_transform_error_exit_2(stub_export: dict[str, Any]) -> None:
    stub_export["raise"] = ExportError("out: not empty (use --force)")
    res = run("transform", "in", "out")
    assert res.exit_code == 2
    assert res.stderr == "error: out: not empty (use --force)\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_transform_progress_bar_on_terminal(stub_export: dict[str, Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # not a terminal (CliRunner's stderr): plain lines, one per call
    res = run("transform", "in", "out")
    assert res.exit_code == 0, res.stderr
    assert re.search(r"^shards: 1/2 model-00001-of-00002.safetensors \(\d+s\)$", res.stderr,
                     re.M), res.stderr
    assert "shards: 2/2 model-00002-of-00002.safetensors" in res.stderr
    # a terminal: rich's bar, no plain lines
    buf = _Terminal()
    monkeypatch.setattr(sys, "stderr", buf)
    with cli.progress_reporter("shards") as progress:
        progress(1, 2, "model-00001-of-00002.safetensors")
        progress(2, 2, "model-00002-of-00002.safetensors")
    assert "model-0000" in buf.getvalue() and "2/2" in buf.getvalue()
    assert "shards: 2/2" not in buf.getvalue()


# -------------------------------------------------------------------------- verify (stub loading)

@pytest.fixture(scope="module")
def tiny_rev() -> Any:
    return revffn_fx.transform(tiny_model("mixtral"))


def test_verify_prints_report(monkeypatch: pytest.MonkeyPatch, tiny_rev: Any) -> None:
    monkeypatch.setattr(cli, "_load_rev", lambda out_dir: tiny_rev)
    monkeypatch.setattr(cli, "_check_model_dir", lambda path: None)
    res = run("verify", "somewhere", "--batch", "1", "--seq", "8", "--seed", "3")
    assert res.exit_code == 0, res.stderr
    assert "reconstruction per reversible layer" in res.stdout
    assert "model.layers.0" in res.stdout and "model.layers.1" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith("OK: gradient error")


def test_verify_failure_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    report = revffn_fx.VerifyReport(ok=False, max_grad_rel_err=0.5, worst_param="w",
                                    embedding_grad_rel_err=0.0, loss=1.0, grad_tol=1e-4,
                                    recon_tol=1e-4, dtype="float32")
    fake = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=16))
    seen: dict[str, Any] = {}

    def fake_verify(rev: Any, ids: torch.Tensor, **kw: Any) -> Any:
        seen.update(shape=tuple(ids.shape), **kw)
        return report

    monkeypatch.setattr(cli, "_load_rev", lambda out_dir: fake)
    monkeypatch.setattr(cli, "_check_model_dir", lambda path: None)
    monkeypatch.setattr(revffn_fx, "verify", fake_verify)
    res = run("verify", "out", "--batch", "3", "--seq", "5", "--router")
    assert res.exit_code == 2
    assert "FAILED" in res.stdout
    assert len(res.stderr.splitlines()) == 1 and "verification failed" in res.stderr
    assert seen == dict(shape=(3, 5), output_router_logits=True, seed=0)


# ------------------------------------------------------------------------- transform (real export)

@pytest.mark.slow
def test_transform_then_verify_end_to_end(tmp_path: Path, zoo_dir: Any) -> None:
    out = tmp_path / "rev"
    res = script("revffn-transform", str(zoo_dir("mixtral")), str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "config.json").is_file()
    assert "converted 2 of 2 layers" in res.stdout and "parameters added" in res.stdout
    res = run("verify", str(out), "--batch", "1", "--seq", "8")
    assert res.exit_code == 0, res.stderr
    assert "model.layers.1" in res.stdout
    assert res.stdout.rstrip().splitlines()[-1].startswith("OK:")


def test_transform_dry_run_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "rev"
    res = run("transform", str(EXAMPLE), str(out), "--dry-run", "--layers", "0-1")
    assert res.exit_code == 0, res.stderr
    assert "converted 2 of 4 layers" in res.stdout and "dry run: nothing written" in res.stdout
    assert not out.exists()


def test_transform_out_inside_model_dir_exit_2(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(EXAMPLE, model)
    res = CliRunner().invoke(cli.transform_main, [str(model), str(model / "out")])
    assert res.exit_code == 2
    assert len(res.stderr.splitlines()) == 1 and res.stderr.startswith("error: ")
    assert not (model / "out").exists()
