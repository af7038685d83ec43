"""Adapter calibration (rf.calibrate) and wide streams (stream_dtype)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.calibration import calibration_batches
from revffn_fx.errors import RevFFNError

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "examples" / "tiny-moe-stdlib"
TASK = ROOT / "examples" / "data"
SCRIPT = Path(sys.executable).parent / "revffn-transform"
# a missing console script is a broken install: the tests using it fail, they do not skip


def _ids(vocab: int, batch: int = 4, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _task_loss(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in batches]
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_calibration_brings_the_pretrained_model_back() -> None:
    """On the shipped pretrained model, calibrated adapters fit every layer better and the
    coupled model's loss on held-out text of the calibration kind drops."""
    fit = calibration_batches(PRETRAINED, TASK / "train.jsonl", 4096, seq=128)
    held = calibration_batches(PRETRAINED, TASK / "eval.jsonl", 2048, seq=128)
    model = rf.load_model(PRETRAINED, experts_implementation="eager")
    rev = rf.transform(model, coupling="revffn")
    before = _task_loss(rev, held)
    report = rf.calibrate(rev, fit)
    after = _task_loss(rev, held)
    original = _task_loss(model, held)
    assert report.tokens == 4096 and [f.index for f in report.layers] == [0, 1, 2, 3]
    for f in report.layers:
        assert f.rel_err_after < f.rel_err_before - 0.05, f
    # measured: original model 6.23, default adapters 7.89, calibrated 6.41
    assert after < before - 1.0, (before, after, original)
    assert "calibrated 4 layers on 4096 tokens" in report.summary()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "granitemoe", "hand"])
def test_calibration_is_generic_and_keeps_the_backward_exact(arch: str) -> None:
    model = tiny_model(arch, dtype=torch.float64)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 128
    rev = rf.transform(model, coupling="revffn")
    init = {k: v.clone() for k, v in rev.adapters.state_dict().items()}
    report = rf.calibrate(rev, _ids(vocab, seed=1).split(2))
    assert [f.index for f in report.layers] == rev.converted
    for f in report.layers:  # least squares from the current init cannot be much worse
        assert f.rel_err_after <= f.rel_err_before + 1e-3, f
    assert sum(f.rel_err_after for f in report.layers) < sum(
        f.rel_err_before for f in report.layers) - 0.01, report.layers
    assert all(not torch.equal(v, init[k]) for k, v in rev.adapters.state_dict().items())
    check = rf.verify(rev, _ids(vocab, batch=2, seq=12, seed=2))
    assert check.ok and check.max_grad_rel_err < 1e-9, check.summary()


def test_calibration_leaves_padding_out() -> None:
    model = tiny_model("mixtral")
    vocab = model.config.vocab_size
    ids = _ids(vocab, batch=2, seq=16, seed=3)
    padded = torch.cat([ids, torch.full((2, 5), 1)], dim=1)
    mask = torch.cat([torch.ones(2, 16), torch.zeros(2, 5)], dim=1).long()
    plain = rf.transform(model, coupling="revffn")
    rf.calibrate(plain, [ids])
    masked = rf.transform(model, coupling="revffn")
    report = rf.calibrate(masked, [{"input_ids": padded, "attention_mask": mask}])
    assert report.tokens == 32
    default = rf.transform(model, coupling="revffn").adapters.state_dict()
    for k, v in plain.adapters.state_dict().items():
        assert not torch.allclose(v, default[k])
        torch.testing.assert_close(masked.adapters.state_dict()[k], v, atol=1e-4, rtol=1e-4)


def test_calibration_errors() -> None:
    model = tiny_model("mixtral")
    with pytest.raises(RevFFNError, match="revnet coupling has none"):
        rf.calibrate(rf.transform(model, coupling="revnet"), [_ids(32)])
    rev = rf.transform(model, coupling="revffn")
    with pytest.raises(RevFFNError, match="empty"):
        rf.calibrate(rev, [])
    with pytest.raises(RevFFNError, match="input_ids"):
        rf.calibrate(rev, [{"ids": _ids(32)}])
    with pytest.raises(RevFFNError, match="unknown stream dtype"):
        rf.transform(model, stream_dtype="int8")


@pytest.mark.slow
def test_wide_streams_make_the_fp32_backward_exact() -> None:
    """Calibrated adapters have gains > 1: in fp32 streams, the reconstruction's rounding
    error is amplified through the stack (measured 7e-3 gradient error on layer 0), which
    rf.verify's criterion fails; the default streams (fp64 over fp32 weights) make the
    reconstruction exact, so the generated backward is as exact as autograd."""
    fit = calibration_batches(PRETRAINED, TASK / "train.jsonl", 4096, seq=128)
    model = rf.load_model(PRETRAINED, experts_implementation="eager")
    ids = _ids(model.config.vocab_size, batch=2, seq=16)
    reports = {}
    for wide in ("float32", None):
        rev = rf.transform(model, coupling="revffn", stream_dtype=wide)
        rf.calibrate(rev, fit)
        reports[wide] = rf.verify(rev, ids)
        out = rev(ids, labels=ids)
        assert out.logits is None or out.logits.dtype == torch.float32
    default, narrow = reports[None], reports["float32"]
    assert default.ok and default.max_grad_rel_err <= 1.01 * default.autograd_err, \
        default.summary()
    assert not narrow.ok and narrow.max_grad_rel_err > 100 * default.max_grad_rel_err, \
        narrow.summary()


def test_stream_dtype_round_trips_through_export(tmp_path: Path) -> None:
    model = tiny_model("mixtral")
    rev = rf.transform(model, coupling="revffn", stream_dtype="float64")
    rev.save_pretrained(tmp_path / "out")
    back = rf.load(tmp_path / "out")
    assert back.options.stream_dtype == torch.float64
    ids = _ids(model.config.vocab_size, batch=2, seq=8)
    torch.testing.assert_close(back(ids).logits, rev(ids).logits, atol=0, rtol=0)


@pytest.mark.slow
def test_transform_cli_calibrates(tmp_path: Path) -> None:
    out = tmp_path / "rev"
    res = subprocess.run([str(SCRIPT), str(PRETRAINED), str(out), "--calibrate",
                          str(TASK / "train.jsonl"), "--calibration-tokens", "2048", "--verify"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "adapters: calibrated 4 layers on 2048 tokens" in res.stdout
    assert "streams: carried in float64" in res.stdout and "verify: OK" in res.stdout
    section = json.loads((out / "config.json").read_text())["revffn"]
    assert section["transform"]["stream_dtype"] == "float64"
    assert section["calibration"]["tokens"] == 2048
    back = rf.load(out)
    plain = rf.transform(rf.load_model(PRETRAINED), coupling="revffn")
    fitted = back.adapters.state_dict()
    assert any(not torch.equal(v, fitted[k]) for k, v in plain.adapters.state_dict().items())
    for args, message in (([str(tmp_path / "missing.txt")], "does not exist"),
                          ([str(TASK / "train.jsonl"), "--coupling", "revnet"], "revnet")):
        bad = tmp_path / "bad"
        res = subprocess.run([str(SCRIPT), str(PRETRAINED), str(bad), "--calibrate", *args],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and message in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and not bad.exists()


def test_calibration_with_layers_left_out() -> None:
    """Layers outside the stacks run as they are, on both the pretrained and the coupled
    state; only the converted layers are fitted and reported."""
    model = tiny_model("qwen2_moe", dtype=torch.float64)
    n = model.config.num_hidden_layers
    rev = rf.transform(model, coupling="revffn", layers=[n - 1])
    assert rev.converted == [n - 1] and n >= 2
    report = rf.calibrate(rev, [_ids(model.config.vocab_size, seed=5)])
    assert [f.index for f in report.layers] == [n - 1]
    assert report.layers[0].rel_err_after < report.layers[0].rel_err_before
    check = rf.verify(rev, _ids(model.config.vocab_size, batch=2, seq=12, seed=6))
    assert check.ok, check.summary()
