"""Reliability, second round (issue 29): MODEL_DIR safe from aliases and leftover recovery,
--force only on what revffn-fx wrote, exports protected beyond the weights, inputs bounded
before allocation.

In the style of tests/test_reliability.py: each bad input runs through the CLI in process
(click's CliRunner): exit status 2, one ``error:`` line naming the file or option, files
untouched. A killed run is a forked CLI stopped at a ``REVFFN_TEST_PAUSE`` point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability import (
    TINY,
    WEIGHTS,
    _exit_code,
    _fork_cli,
    _invoke,
    _one_error_line,
    _tree,
    _wait_for,
)

import revffn_fx as rf
from revffn_fx.cli import main, transform
from revffn_fx.errors import ExportError, LoadError, RevFFNError
from revffn_fx.export import SHIM_FILE, transform_dir
from revffn_fx.outdir import ASIDE, MARKER, recover

Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good revffn export of the tiny model (copied by the tests that change it)."""
    out = tmp_path_factory.mktemp("exp") / "out"
    transform_dir(TINY, out)
    return out


def _all_files(path: Path) -> dict[str, bytes]:
    """Every file and its bytes, markers included: nothing may change."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warning lines the run printed (on stderr outside pytest, which captures them)."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning: ")]


# ------------------------------------------------- 1. MODEL_DIR under another path (aliases)

def _bind(src: Path, dst: Path) -> bool:
    dst.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(dst)],
                        capture_output=True).returncode == 0
    if not ok:
        dst.rmdir()
    return ok


def _unbind(dst: Path) -> None:
    subprocess.run(["umount", str(dst)], check=True)
    dst.rmdir()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="bind mounts need root")
def test_model_dir_bind_mount_of_out_dir_refused(export: Path, tmp_path: Path) -> None:
    """MODEL_DIR a bind mount of OUT_DIR (or of a directory above it): the paths differ,
    device and inode do not; --force (even --force-foreign) is refused, nothing moves."""
    out = Path(shutil.copytree(export, tmp_path / "out"))
    for f in TINY.iterdir():  # OUT_DIR holds a model too: what MODEL_DIR shows
        shutil.copy(f, out / f.name)
    good = _all_files(out)
    mnt = tmp_path / "mnt"
    if not _bind(out, mnt):
        pytest.skip("mount --bind is not permitted here")
    try:
        assert mnt.resolve() != out.resolve()  # a path comparison cannot see it
        for flags in (["--force"], ["--force-foreign"]):
            res = _invoke(transform, [str(mnt), str(out), *flags])
            assert res.exit_code == 2, res.output
            _one_error_line(res, "OUT_DIR is MODEL_DIR")
        assert _all_files(out) == good
    finally:
        _unbind(mnt)
    # a bind mount of OUT_DIR's parent: MODEL_DIR is inside OUT_DIR under another path
    top = Path(shutil.copytree(export, tmp_path / "top"))
    shutil.copytree(TINY, top / "model")
    good = _all_files(top)
    if not _bind(top, mnt):
        pytest.skip("mount --bind is not permitted here")
    try:
        res = _invoke(transform, [str(mnt / "model"), str(top), "--force-foreign"])
        assert res.exit_code == 2, res.output
        _one_error_line(res, "OUT_DIR contains MODEL_DIR")
        assert _all_files(top) == good
    finally:
        _unbind(mnt)


def test_model_dir_alias_seen_by_device_and_inode(export: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusals without root: os.stat reports MODEL_DIR's device and inode for
    OUT_DIR (what a bind mount or an aliasing filesystem does)."""
    import revffn_fx.outdir_refusals as od

    model = Path(shutil.copytree(TINY, tmp_path / "model"))
    out = Path(shutil.copytree(export, tmp_path / "out"))
    good, model_good = _all_files(out), _all_files(model)
    real = od._id

    def aliased(path: Path):
        return real(model) if Path(path).absolute() == out.absolute() else real(path)

    monkeypatch.setattr(od, "_id", aliased)
    res = _invoke(transform, [str(model), str(out), "--force"])
    assert res.exit_code == 2, res.output
    _one_error_line(res, "OUT_DIR is MODEL_DIR")
    # MODEL_DIR's parent aliased as OUT_DIR: OUT_DIR contains MODEL_DIR
    monkeypatch.setattr(od, "_id", lambda p: real(tmp_path) if Path(p).absolute()
                        == out.absolute() else real(p))
    res = _invoke(transform, [str(model), str(out), "--force"])
    _one_error_line(res, "OUT_DIR contains MODEL_DIR")
    # a directory inside OUT_DIR that is MODEL_DIR: --force would delete it
    monkeypatch.setattr(od, "_id", lambda p: real(model) if Path(p).absolute()
                        == (out / "sub").absolute() else real(p))
    (out / "sub").mkdir()
    good = _all_files(out)
    res = _invoke(transform, [str(model), str(out), "--force-foreign"])
    assert res.exit_code == 2, res.output
    _one_error_line(res, "is MODEL_DIR or a directory above it")
    assert _all_files(out) == good and _all_files(model) == model_good


# -------------------------------------------------------------------- 2. leftover recovery

def test_model_dir_named_like_a_leftover_is_never_touched(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MODEL_DIR named OUT.revffn-tmp-<dead pid>: transformed into OUT, left as it was."""
    dead = 2**22 + 12345  # above pid_max: no such process
    model = Path(shutil.copytree(TINY, tmp_path / f"out.revffn-tmp-{dead}"))
    good = _all_files(model)
    res = _invoke(transform, [str(model), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert _all_files(model) == good
    assert any("it is MODEL_DIR" in w and "not touched" in w for w in _warnings(caplog))
    assert rf.load(tmp_path / "out").converted == [0, 1, 2, 3]


def test_unmarked_leftovers_are_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Named like leftovers, but no marker with the token the lock file records: kept."""
    dead = 2**22 + 777
    out = tmp_path / "out"
    mine = tmp_path / f"out.revffn-old-{dead}"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    forged = tmp_path / f"out.revffn-tmp-{dead + 1}"  # a marker, but not the recorded token
    forged.mkdir()
    (forged / MARKER).write_text(json.dumps({"written_by": "revffn-fx", "token": "0" * 32}))
    (tmp_path / "out.revffn-lock").write_text(json.dumps(
        {"runs": [{"pid": dead + 1, "token": "f" * 32}]}))
    res = _invoke(transform, [str(TINY), str(out)])
    assert res.exit_code == 0, res.output
    assert (mine / "thesis.tex").read_text() == "years of work" and forged.is_dir()
    assert not out.with_name("out").joinpath("thesis.tex").exists()
    warned = [w for w in _warnings(caplog) if "not marked by it" in w]
    assert len(warned) == 2, warned


@pytest.mark.slow
def test_killed_run_leftovers_removed_with_a_message(export: Path, tmp_path: Path) -> None:
    """Killed with the staging directory written: the next run removes it and says so;
    killed between the two renames of a swap: the aside copy is restored, but never when
    it is the MODEL_DIR of the next run (re-transforming from the aside export)."""
    runs = {}
    for point in ("staged", "aside"):
        out = Path(shutil.copytree(export, tmp_path / point / "out"))
        mark = tmp_path / f"{point}.mark"
        runs[point] = (out, mark, _fork_cli([str(TINY), str(out), "--force", "--coupling",
                                             "revnet"], tmp_path / f"{point}.log",
                                            pause=point, mark=mark))
    _wait_for([m for _, m, _ in runs.values()], [p for _, _, p in runs.values()])
    for _, _, pid in runs.values():
        os.kill(pid, signal.SIGKILL)
        assert _exit_code(pid) == -signal.SIGKILL
    out, _, pid = runs["staged"]
    # the real console script (outside pytest's log capture): the message is on stderr
    res = subprocess.run([sys.executable, "-m", "revffn_fx", "transform", str(TINY), str(out),
                          "--force"],
                         capture_output=True, text=True, env={**os.environ,
                                                              "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stderr.splitlines() if "removed, left by a killed" in ln] == [
        f"warning: {out.parent}/out.revffn-tmp-{pid}: removed, left by a killed revffn-fx run "
        f"(process {pid})"], res.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    # the aside copy: a complete old export, marked, recorded in the lock file
    out, _, pid = runs["aside"]
    aside = out.parent / f"out.revffn-old-{pid}"
    assert not out.exists() and (aside / ASIDE).is_file()
    good = _all_files(aside)
    recover(out, model_dir=aside)  # what a run from the aside export into OUT does first
    assert not out.exists() and _all_files(aside) == good
    recover(out)  # any other run restores it
    assert out.is_dir() and not aside.exists() and not (out / ASIDE).exists()
    assert rf.load(out).coupling == "revffn"


# ------------------------------------------------------ 3. --force only on what we wrote

def test_force_replaces_only_what_revffn_fx_wrote(export: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    good = _all_files(foreign)
    res = _invoke(transform, [str(TINY), str(foreign), "--force"])
    assert res.exit_code == 2, res.output
    _one_error_line(res, f"{foreign}: not written by revffn-fx (no {MARKER} marker)")
    assert _all_files(foreign) == good
    with pytest.raises(ExportError, match="--force-foreign"):
        transform_dir(TINY, foreign, force=True)
    # an export with a file revffn-fx did not write in it
    out = Path(shutil.copytree(export, tmp_path / "out"))
    (out / "notes.txt").write_text("mine")
    good = _all_files(out)
    res = _invoke(transform, [str(TINY), str(out), "--force"])
    _one_error_line(res, "holds 'notes.txt', which revffn-fx did not write")
    assert _all_files(out) == good
    (out / "notes.txt").unlink()
    assert _invoke(transform, [str(TINY), str(out), "--force"]).exit_code == 0
    res = _invoke(transform, [str(TINY), str(foreign), "--force-foreign"])
    assert res.exit_code == 0, res.output
    assert not (foreign / "notes.txt").exists() and (foreign / MARKER).is_file()


# ------------------------------------------------------ 4. an index beside model.safetensors

def _with_index(src: Path, same: bool) -> None:
    t = load_file(src / WEIGHTS)
    if not same:
        t[Q] = t[Q] + 1
    save_file(t, src / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}))


def test_index_and_single_file_that_disagree_are_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    _with_index(src, same=False)
    before = _tree(tmp_path)
    text = (f"{src}: model.safetensors and model.safetensors.index.json hold different "
            f"weights (Hugging Face reads model.safetensors): tensor {Q} has other values")
    res = _invoke(transform, [str(src), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    _one_error_line(res, text)
    res = _invoke(main, ["inspect", str(src)])
    assert res.exit_code == 2
    _one_error_line(res, text)
    assert _tree(tmp_path) == before
    same = Path(shutil.copytree(TINY, tmp_path / "same"))
    _with_index(same, same=True)
    res = _invoke(transform, [str(same), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (f"note: {same}: model.safetensors and model.safetensors.index.json hold the "
            "same weights; reading model.safetensors") in [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------ 5. the record covers it all

def _edit_config(out: Path, edit) -> None:
    raw = json.loads((out / "config.json").read_text())
    edit(raw)
    (out / "config.json").write_text(json.dumps(raw, indent=2))


RECORD_CASES = [
    ("coupling", lambda c: c["revffn"]["transform"].update(coupling="revnet"),
     "its 'revffn' section changed since it was written"),
    ("stream_dtype", lambda c: c["revffn"]["transform"].update(stream_dtype="float32"),
     "its 'revffn' section changed"),
    ("rope_theta", lambda c: c.update(rope_parameters={"rope_theta": 10.0,
                                                       "rope_type": "default"}),
     "its model config fields changed since it was written"),
    ("rms_norm_eps", lambda c: c.update(rms_norm_eps=0.1), "its model config fields changed"),
    ("top_k", lambda c: c.update(num_experts_per_tok=1), "its model config fields changed"),
    ("record_removed", lambda c: c["revffn"].pop("sha256"), "has no sha256 record"),
    ("record_list", lambda c: c["revffn"].update(sha256=[1]), "sha256 record is malformed"),
    ("record_weights_only", lambda c: c["revffn"].update(sha256={
        WEIGHTS: c["revffn"]["sha256"][WEIGHTS]}), "the sha256 record has no entry for"),
]


@pytest.mark.parametrize("case,edit,text", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_export_metadata_is_protected(case: str, edit, text: str, export: Path,
                                      tmp_path: Path) -> None:
    out = Path(shutil.copytree(export, tmp_path / "out"))
    _edit_config(out, edit)
    good = _all_files(out)
    with pytest.raises(LoadError, match=text):
        rf.load(out)
    res = _invoke(main, ["verify", str(out)])
    assert res.exit_code == 2, res.output
    _one_error_line(res, text)
    assert _all_files(out) == good
    if case in ("record_removed", "record_list", "rms_norm_eps"):  # the user's explicit way
        assert rf.load(out, check_files=False).converted == [0, 1, 2, 3]
        assert _invoke(main, ["verify", str(out), "--no-check"]).exit_code == 0


def test_shim_and_format_version_are_checked(export: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(export, tmp_path / "out"))
    with open(out / SHIM_FILE, "a") as f:
        f.write("import os  # added\n")
    with pytest.raises(LoadError, match=f"{SHIM_FILE}: changed since it was written"):
        rf.load(out)
    shutil.copy(export / SHIM_FILE, out / SHIM_FILE)
    for version in (0, True, "1", 1.0, -1, 99):
        _edit_config(out, lambda c, v=version: c["revffn"].update(format_version=v))
        for check in (True, False):  # refused before the record is read
            with pytest.raises(LoadError, match=f"format_version {version!r} is not one"):
                rf.load(out, check_files=check)
        res = _invoke(main, ["verify", str(out), "--no-check"])
        _one_error_line(res, f"format_version {version!r} is not one this revffn-fx reads")


def test_save_pretrained_writes_the_full_record(export: Path, tmp_path: Path) -> None:
    rf.load(export).save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "config.json").read_text())["revffn"]["sha256"]
    assert {"config.json", "config.json:revffn", SHIM_FILE, WEIGHTS} <= set(record)
    assert (tmp_path / "saved" / MARKER).is_file()
    assert rf.load(tmp_path / "saved").converted == [0, 1, 2, 3]


# --------------------------------------------------------------- 6. any checkpoint dtype

def _as_dtype(src: Path, dtype: str) -> None:
    t = load_file(src / WEIGHTS)
    save_file({k: v.to(getattr(torch, dtype)) for k, v in t.items()}, src / WEIGHTS,
              metadata={"format": "pt"})
    _edit_config(src, lambda c: c.update(dtype=dtype))


def test_float64_checkpoint_is_converted_and_verified(tmp_path: Path) -> None:
    """HF's default grouped_mm experts have no float64 kernel on the CPU: rf.load_model
    picks the eager experts for a float64 model, so --verify passes (was: exit 1)."""
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    _as_dtype(src, "float64")
    res = _invoke(transform, [str(src), str(tmp_path / "out"), "--verify"])
    assert res.exit_code == 0, res.output
    assert "verify: OK" in res.output
    rev = rf.load(tmp_path / "out")
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert rev(ids).logits.dtype == torch.float64
    assert rf.load_model(src).config._experts_implementation == "eager"


def test_unconvertible_dtype_exits_2(tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    t = load_file(src / WEIGHTS)
    t[Q] = t[Q].to(torch.float8_e4m3fn)
    save_file(t, src / WEIGHTS, metadata={"format": "pt"})
    before = _tree(tmp_path)
    res = _invoke(transform, [str(src), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    _one_error_line(res, f"tensor {Q} is stored as F8_E4M3, a dtype revffn-fx does not convert")
    assert _tree(tmp_path) == before


# -------------------------------------------------------- 7. sizes bounded before allocation

@pytest.mark.slow
def test_absurd_layer_count_answered_in_seconds(tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    _edit_config(src, lambda c: c.update(num_hidden_layers=100000))
    before = _tree(tmp_path)
    start = time.monotonic()
    res = _invoke(transform, [str(src), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    _one_error_line(res, "num_hidden_layers is 100000 but the checkpoint holds 4 decoder "
                         "layer(s) (model.layers.<i>)")
    assert time.monotonic() - start < 60  # was 4m48s and 4.7 GB
    for cmd in (["inspect", str(src)],):
        res = _invoke(main, cmd)
        _one_error_line(res, "num_hidden_layers is 100000")
    assert _tree(tmp_path) == before
    # `revffn plan` reads the config only: it answers (one layer built per kind)
    start = time.monotonic()
    res = _invoke(main, ["plan", str(src)])
    assert res.exit_code == 0, res.output
    assert time.monotonic() - start < 60  # was past 300 s
    _edit_config(src, lambda c: c.update(num_hidden_layers=10**9, hidden_size=4096))
    res = _invoke(main, ["plan", str(src)])
    assert res.exit_code == 2
    _one_error_line(res, "config.json: describes about")


def test_config_larger_than_checkpoint_refused_before_allocation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config far larger than its checkpoint is refused from the headers, before
    from_pretrained allocates anything (was: 1.9 GB RSS for a 1.9 MB checkpoint)."""
    import revffn_fx.frontend.loading as loading

    def allocate(*a, **k):
        raise AssertionError("from_pretrained was called: the model would be allocated")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", allocate)
    for change, text in [(dict(intermediate_size=128 * 400),
                          "mlp.experts.down_proj has shape [4, 64, 128]"),
                         (dict(num_local_experts=400), "the config has 400 experts per layer "
                                                        "but the checkpoint holds 4"),
                         (dict(hidden_size=4096, num_attention_heads=64, head_dim=64),
                          "lm_head.weight has shape [256, 64] in the checkpoint but [256, 4096]")]:
        src = Path(shutil.copytree(TINY, tmp_path / f"src{len(change)}{list(change)[0]}"))
        _edit_config(src, lambda c, ch=change: c.update(ch))
        with pytest.raises(LoadError, match="weights do not fit config.json") as info:
            rf.load_model(src)
        assert text in str(info.value), str(info.value)


def test_count_parameters_per_layer_kind_matches_a_full_build() -> None:
    from transformers import AutoModelForCausalLM
    from zoo import tiny_config

    from revffn_fx.frontend.loading import count_parameters

    for name, over in [("mixtral", {}), ("deepseek_v3", dict(first_k_dense_replace=2)),
                       ("qwen2_moe", dict(decoder_sparse_step=2)), ("gpt_oss", {})]:
        cfg = tiny_config(name, num_hidden_layers=7, **over)
        with torch.device("meta"):
            sizes = [p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()]
        assert count_parameters(cfg) == (sum(sizes), max(sizes)), name


def test_calibration_jsonl_bounded_by_the_token_budget(tmp_path: Path) -> None:
    from revffn_fx.calibration import _calibration_texts

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"text": "word " * 100_000}) + "\n"  # 500 KB row
                    + json.dumps({"text": "more"}) + "\n")
    texts = list(_calibration_texts(rows, tokens=4096))
    assert sum(map(len, texts)) == 32 * 4096  # cut to the budget, the next row unread
    huge = tmp_path / "huge.jsonl"
    huge.write_text(json.dumps({"text": "x" * 20_000_000}) + "\n")  # 20 MB in one row
    with pytest.raises(LoadError, match=r"huge.jsonl:1: row longer than 1,048,576 characters"):
        list(_calibration_texts(huge, tokens=4096))


# --------------------------------------------------------------------- 8. smaller defects

def test_nonfinite_weights_refused_naming_the_tensor(tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    t = load_file(src / WEIGHTS)
    t[Q] = t[Q].clone()
    t[Q][3, 5] = float("nan")
    save_file(t, src / WEIGHTS, metadata={"format": "pt"})
    before = _tree(tmp_path)
    res = _invoke(transform, [str(src), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    _one_error_line(res, f"{src / WEIGHTS}: tensor {Q} holds NaN or Inf values")
    assert _tree(tmp_path) == before
    res = _invoke(transform, [str(src), str(tmp_path / "out"), "--allow-nonfinite"])
    assert res.exit_code == 0, res.output


def test_attention_mask_of_another_shape_is_read_as_hugging_face_reads_it() -> None:
    model = rf.load_model(TINY)
    rev = rf.transform(model, coupling="none")  # the exact mode: the same function
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for width in (10, 16, 20):  # shorter: the rest is masked; longer: cut to the ids
            mask = torch.ones(2, width, dtype=torch.long)
            want = model(ids, attention_mask=mask).logits
            assert torch.equal(rev(ids, attention_mask=mask).logits, want), width
        for shape in ((16,), (2, 16, 1), (3, 16)):
            with pytest.raises(RevFFNError, match=r"attention_mask has shape .* it must be "
                                                  r"\(batch, sequence\) = \[2, 16\]"):
                rev(ids, attention_mask=torch.ones(shape, dtype=torch.long))


def test_stray_aside_marker_of_a_killed_run_is_removed(export: Path, tmp_path: Path) -> None:
    """Killed after marking OUT_DIR for its swap but before the swap: OUT_DIR is the old
    export plus that run's .revffn-aside; recovery removes the marker it recorded only."""
    out = Path(shutil.copytree(export, tmp_path / "out"))
    (out / ASIDE).write_text(json.dumps({"written_by": "revffn-fx", "token": "a" * 32}))
    (tmp_path / "out.revffn-lock").write_text(json.dumps(
        {"runs": [{"pid": 2**22 + 5, "token": "b" * 32}]}))
    recover(out)
    assert (out / ASIDE).exists()  # not the recorded token: not touched
    (tmp_path / "out.revffn-lock").write_text(json.dumps(
        {"runs": [{"pid": 2**22 + 5, "token": "a" * 32}]}))
    recover(out)
    assert not (out / ASIDE).exists() and rf.load(out).converted == [0, 1, 2, 3]
