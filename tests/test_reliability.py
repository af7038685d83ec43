"""A user's files are never lost, nothing outside MODEL_DIR is read, every bad input exits 2.

Each bad-input case is built in a temporary directory and run through the CLI in process
(click's CliRunner): exit status 2, one ``error:`` line naming the file or option, no
traceback, OUT_DIR absent or unchanged, nothing left beside it. Kills, SIGTERM, a real
write error (a file-size limit) and two concurrent writers run the CLI in forked processes,
with the ``REVFFN_TEST_PAUSE`` hook stopping one at a named point of the write.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import revffn_fx as rf
from revffn_fx.cli import main, transform
from revffn_fx.errors import LoadError
from revffn_fx.export import ADAPTER_FILE, transform_dir
from revffn_fx.frontend.loading import load_model
from revffn_fx.outdir import ASIDE, MARKER, recover

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"
WEIGHTS = "model.safetensors"
Q = "model.layers.0.self_attn.q_proj.weight"


def _digest(path: Path) -> dict[str, str]:
    """Every file's sha256 (the markers aside: they hold a random token)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name not in (MARKER, ASIDE)}


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def old_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good revffn export of the tiny model: the OUT_DIR that --force runs replace."""
    out = tmp_path_factory.mktemp("old") / "out"
    transform_dir(TINY, out)
    return out


@pytest.fixture(scope="module")
def new_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``--force --coupling revnet`` writes (deterministic: no adapters)."""
    out = tmp_path_factory.mktemp("new") / "out"
    transform_dir(TINY, out, coupling="revnet", max_shard_size="256KB")
    return out


# ------------------------------------------------------------------------------ the cases

def _cfg(**changes: object) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        (src / "config.json").write_text(json.dumps(cfg))
    return edit


def _index(weight_map: object) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        (src / WEIGHTS).rename(src / "model-00001-of-00001.safetensors")
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return edit


def _tensor_dtype(dtype: torch.dtype) -> Callable[[Path], None]:
    def edit(src: Path) -> None:
        t = load_file(src / WEIGHTS)
        t[Q] = t[Q].to(dtype)
        save_file(t, src / WEIGHTS, metadata={"format": "pt"})
    return edit


def _header_size(src: Path) -> None:
    data = bytearray((src / WEIGHTS).read_bytes())
    data[:8] = struct.pack("<Q", 1 << 40)  # a header "larger" than the file
    (src / WEIGHTS).write_bytes(bytes(data))


def _secret(tmp: Path) -> Path:
    (tmp / "secret.txt").write_text("API_KEY=hunter2")
    return tmp / "secret.txt"


def _link(name: str, target: Callable[[Path, Path], str]) -> Callable[[Path, Path], None]:
    def edit(src: Path, tmp: Path) -> None:
        if os.path.lexists(src / name):
            (src / name).unlink()
        os.symlink(target(src, tmp), src / name)
    return edit


def _weights_outside(src: Path, tmp: Path) -> None:
    (tmp / "elsewhere").mkdir()
    (src / WEIGHTS).rename(tmp / "elsewhere" / WEIGHTS)
    os.symlink(tmp / "elsewhere" / WEIGHTS, src / WEIGHTS)


def _src_only(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    return lambda src, tmp: edit(src)


def _nothing(src: Path, tmp: Path) -> None:
    return None


# (id, damage(src, tmp), extra CLI args, text the error line must contain)
CASES: list[tuple[str, Callable[[Path, Path], None], list[str], str]] = [
    ("config_list", _src_only(lambda s: (s / "config.json").write_text("[1, 2]")), [],
     "config.json: not a JSON object"),
    ("config_nested", _src_only(lambda s: (s / "config.json").write_text(
        '{"model_type": "mixtral", "x": ' + "[" * 100000 + "]" * 100000 + "}")), [],
     "config.json: JSON nested too deeply"),
    ("hidden_size_string", _src_only(_cfg(hidden_size="64")), [],
     "config.json: hidden_size must be a positive integer"),
    ("dtype_unknown", _src_only(_cfg(dtype="float99")), [], "config.json: dtype 'float99'"),
    ("top_k_above_experts", _src_only(_cfg(num_experts_per_tok=99)), [],
     "config.json: num_experts_per_tok 99 is larger than the number of experts (4)"),
    ("eos_token_string", _src_only(_cfg(eos_token_id="x")), [],
     "config.json: invalid config: Validation error for field 'eos_token_id'"),
    ("weight_map_list", _src_only(_index([1, 2])), [], "index.json: not a valid weights index"),
    ("weight_map_not_safetensors", _src_only(_index({Q: "config.json"})), [],
     "index.json: shard 'config.json' is not a .safetensors file"),
    ("weight_map_dotdot", _src_only(_index({Q: "../x.safetensors"})), [],
     "index.json: shard name '../x.safetensors' is not a file name"),
    ("weight_map_absolute", _src_only(_index({Q: "/etc/passwd"})), [],
     "index.json: shard name '/etc/passwd' is not a file name"),
    ("header_size_lies", _src_only(_header_size), [],
     "model.safetensors: truncated or corrupted"),
    ("pickle_only", _src_only(lambda s: (s / WEIGHTS).rename(s / "pytorch_model.bin")), [],
     "pytorch_model.bin: only safetensors checkpoints are read"),
    ("tensor_f64_rounds", _src_only(_tensor_dtype(torch.float64)), [],
     f"tensor {Q} is stored as F64"),
    ("tensor_int32", _src_only(_tensor_dtype(torch.int32)), [], f"tensor {Q} is stored as I32"),
    ("tokenizer_links_out", _link("tokenizer.json", lambda s, t: str(_secret(t))), [],
     "tokenizer.json: leads outside the model directory"),
    ("generation_config_procfs", _link("generation_config.json",
                                       lambda s, t: "/proc/self/environ"), [],
     "generation_config.json: leads outside the model directory"),
    ("weights_link_out", _weights_outside, [], "model.safetensors: leads outside"),
    ("tokenizer_fifo", lambda s, t: os.mkfifo(s / "tokenizer.json"), [],
     "tokenizer.json: not a regular file"),
    ("fixed_point_tol_negative", _nothing, ["--fixed-point-tol", "-1"], "--fixed-point-tol"),
    ("fixed_point_tol_nan", _nothing, ["--fixed-point-tol", "nan"], "--fixed-point-tol"),
    ("layers_reversed", _nothing, ["--layers", "5-2"], "bad layer spec '5-2'"),
    ("layers_comma", _nothing, ["--layers", ","], "bad layer spec ','"),
    ("layers_empty", _nothing, ["--layers", ""], "bad layer spec ''"),
]


def _invoke(cmd, args: list[str]):
    return CliRunner().invoke(cmd, args)


def _one_error_line(res, text: str) -> None:
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.stderr.splitlines()
              if ln.strip() and not ln.startswith("shards: ")]  # progress lines
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert text in errors[0], errors[0]


@pytest.mark.parametrize("case,damage,args,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2(case: str, damage: Callable[[Path, Path], None], args: list[str],
                           text: str, tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    damage(src, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tmp_path)
    res = _invoke(transform, [str(src), str(work / "out"), *args])
    assert res.exit_code == 2, res.output
    _one_error_line(res, text)
    assert _tree(tmp_path) == before  # no OUT_DIR, no staging, nothing anywhere else


def test_out_dir_refusals(old_export: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    out = Path(shutil.copytree(old_export, work / "out"))
    good = _digest(out)
    (work / "link").symlink_to("out")
    (work / "dangling").symlink_to("nowhere")
    (work / "home").mkdir()
    monkeypatch.setenv("HOME", str(work / "home"))
    monkeypatch.chdir(out)
    cases = [("", "current directory"), (".", "current directory"),
             ("..", "current directory"), ("/", "current directory or one of its parents"),
             (str(work / "home"), "home directory"), (str(work / "link"), "symbolic link"),
             (str(work / "dangling"), "dangling symbolic link")]
    before = _tree(tmp_path)
    for spelling, text in cases:
        res = _invoke(transform, [str(TINY), spelling, "--force"])
        assert res.exit_code == 2, (spelling, res.output)
        _one_error_line(res, text)
    monkeypatch.chdir(tmp_path)
    res = _invoke(transform, [str(TINY), str(out)])  # no --force
    _one_error_line(res, "not empty (use --force")
    assert _tree(tmp_path) == before and _digest(out) == good


@pytest.mark.skipif(os.geteuid() == 0, reason="root may delete anything")
def test_undeletable_old_out_dir_refused_up_front(old_export: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(old_export, tmp_path / "out"))
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("x")
    (out / "sub").chmod(0o555)
    try:
        good = _digest(out)
        res = _invoke(transform, [str(TINY), str(out), "--force"])
        assert res.exit_code == 2
        _one_error_line(res, "sub is not writable (nothing was changed)")
        assert _digest(out) == good and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        (out / "sub").chmod(0o755)


def test_write_error_leaves_old_out_dir(old_export: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while writing: one line, exit 2, staging removed, the old OUT_DIR intact."""
    import errno

    import revffn_fx.export.transform as tr

    out = Path(shutil.copytree(old_export, tmp_path / "out"))
    good = _digest(out)
    real = tr.write_shards

    def full_disk(tmp: Path, *args, **kwargs):
        real(tmp, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / ADAPTER_FILE))

    monkeypatch.setattr(tr, "write_shards", full_disk)
    res = _invoke(transform, [str(TINY), str(out), "--force"])
    assert res.exit_code == 2
    _one_error_line(res, "No space left on device (nothing written; ")
    assert _tree(tmp_path) == ["out", *(f"out/{n}" for n in sorted([*good, MARKER]))]
    assert _digest(out) == good


def test_file_size_limit_real_write_error(old_export: Path, tmp_path: Path) -> None:
    """A real OSError from the kernel (EFBIG under RLIMIT_FSIZE) in a separate process."""
    out = Path(shutil.copytree(old_export, tmp_path / "out"))
    good = _digest(out)
    log = tmp_path.parent / f"{tmp_path.name}.log"
    pid = _fork_cli([str(TINY), str(out), "--force", "--coupling", "revnet"], log,
                    fsize_limit=500_000)
    assert _exit_code(pid) == 2
    err = log.read_text()
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {out}: File too large (nothing written; {out} unchanged)"], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and _digest(out) == good


# --------------------------------------------------------------------- paths and integrity

def test_links_inside_model_dir_and_hub_snapshots_are_followed(tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    shutil.copy(src / "generation_config.json", src / "real.json")
    (src / "generation_config.json").unlink()
    (src / "generation_config.json").symlink_to("real.json")
    transform_dir(src, tmp_path / "out")
    assert not (tmp_path / "out" / "generation_config.json").is_symlink()
    # the Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in TINY.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert transform_dir(snap, tmp_path / "out2").converted == [0, 1, 2, 3]


def test_checksums_name_the_changed_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    transform_dir(TINY, out)
    recorded = json.loads((out / "config.json").read_text())["revffn"]["sha256"]
    assert {n: recorded[n] for n in (WEIGHTS, ADAPTER_FILE)} == {
        n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in (WEIGHTS, ADAPTER_FILE)}
    t = load_file(out / ADAPTER_FILE)
    name = sorted(t)[0]
    t[name] = t[name].clone()
    t[name].view(-1)[0] *= 4  # what a flipped exponent bit does
    save_file(t, out / ADAPTER_FILE, metadata={"format": "pt"})
    with pytest.raises(LoadError, match=f"{ADAPTER_FILE}: changed since it was written"):
        rf.load(out)
    assert rf.load(out, check_files=False).converted == [0, 1, 2, 3]
    res = _invoke(main, ["verify", str(out)])
    assert res.exit_code == 2
    _one_error_line(res, f"{ADAPTER_FILE}: changed since it was written")


def test_pickled_weights_refused_everywhere(tmp_path: Path) -> None:
    src = Path(shutil.copytree(TINY, tmp_path / "src"))
    (src / WEIGHTS).rename(src / "pytorch_model.bin")
    with pytest.raises(LoadError, match="only safetensors"):
        load_model(src)
    res = _invoke(main, ["inspect", str(src)])
    assert res.exit_code == 2
    _one_error_line(res, "pytorch_model.bin: only safetensors checkpoints are read")


def test_new_out_dir_has_umask_permissions(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        transform_dir(TINY, tmp_path / "out")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_save_into_existing_dir_keeps_other_files(old_export: Path, tmp_path: Path) -> None:
    ckpt = Path(shutil.copytree(old_export, tmp_path / "checkpoint-2"))
    (ckpt / "model-00001-of-00009.safetensors").write_bytes(b"stale shard")
    (ckpt / "optimizer.pt").write_bytes(b"the Trainer's")
    rf.load(old_export).save_pretrained(ckpt)
    assert (ckpt / "optimizer.pt").read_bytes() == b"the Trainer's"
    assert not (ckpt / "model-00001-of-00009.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert rf.load(ckpt).converted == [0, 1, 2, 3]


def test_calibration_text_is_streamed(tmp_path: Path) -> None:
    from revffn_fx.calibration import _calibration_texts

    big = tmp_path / "big.txt"
    big.write_text("word " * 2_000_000)  # 10 MB
    texts = list(_calibration_texts(big, tokens=4096))
    assert [len(t) for t in texts] == [32 * 4096]


# ------------------------------------------------------------------- kills and concurrency

def _fork_cli(args: list[str], log: Path, pause: str | None = None, mark: Path | None = None,
              fsize_limit: int | None = None) -> int:
    """revffn-transform ARGS in a forked child (torch is already imported: a fresh console
    script costs ~6 s of CPU each); stdout and stderr go to ``log``. Returns the pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        stream = open(log, "w", buffering=1)  # noqa: SIM115 -- the child exits below
        sys.stdout = sys.stderr = stream
        if pause:
            os.environ.update(REVFFN_TEST_PAUSE=pause, REVFFN_TEST_PAUSE_MARK=str(mark))
        if fsize_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
        transform.main(args, prog_name="revffn-transform")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        os._exit(code)


def _exit_code(pid: int, timeout: float = 240) -> int:
    end = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"process {pid} did not finish")
        time.sleep(0.02)


def _wait_for(marks: list[Path], pids: list[int], timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not all(m.exists() for m in marks):
        for pid in pids:
            done, status = os.waitpid(pid, os.WNOHANG)
            assert not done, f"process {pid} ended before its pause point"
        assert time.monotonic() < end, "the pause point was never reached"
        time.sleep(0.02)


POINTS = ["shard", "staged", "aside", "swapped", "deleting"]


@pytest.mark.slow
def test_sigkill_at_every_point_leaves_old_or_new(old_export: Path, new_export: Path,
                                                  tmp_path: Path) -> None:
    """--force over a good OUT_DIR, SIGKILLed at each point of the write (all at once, one
    work directory each): afterwards OUT_DIR loads and is the old or the new export, bit
    for bit; the next run removes what the killed one left."""
    old, new = _digest(old_export), _digest(new_export)
    runs = {}
    for point in POINTS:
        out = Path(shutil.copytree(old_export, tmp_path / point / "out"))
        mark = tmp_path / f"{point}.mark"
        runs[point] = (out, mark, _fork_cli([str(TINY), str(out), "--force", "--coupling",
                                             "revnet", "--max-shard-size", "256KB"],
                                            tmp_path / f"{point}.log", pause=point, mark=mark))
    _wait_for([m for _, m, _ in runs.values()], [p for _, _, p in runs.values()])
    for _, _, pid in runs.values():
        os.kill(pid, signal.SIGKILL)
        assert _exit_code(pid) == -signal.SIGKILL
    for point, (out, _, _) in runs.items():
        if point == "aside":  # the two-rename fallback: the old one is complete, beside it
            (aside,) = out.parent.glob("out.revffn-old-*")
            assert not out.exists() and _digest(aside) == old
            recover(out)  # what the next run does first
        want = new if point in ("swapped", "deleting") else old
        assert _digest(out) == want, point
        assert rf.load(out).coupling == ("revnet" if want is new else "revffn")
    for point, (out, _, _) in runs.items():  # the next run cleans up after the killed one
        transform_dir(TINY, out, coupling="revnet", max_shard_size="256KB", force=True)
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"], point
        assert _digest(out) == new


def _fork_killed_in_swap(args: list[str], log: Path, op: int, when: str) -> int:
    """revffn-transform ARGS in a forked child that SIGKILLs itself ``when`` ("before" or
    "after") the ``op``-th filesystem change of the swap (the Linux exchange, a rename, an
    unlink or rmdir, counted from the start of ``outdir._swap_in``); every change is
    logged as ``op N: NAME -> RESULT``. The exchange stays on (no pause point is set)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        stream = open(log, "w", buffering=1)  # noqa: SIM115 -- the child exits below
        sys.stdout = sys.stderr = stream
        from revffn_fx import outdir

        seen, swapping = [0], [False]

        def counted(name: str, fn: Callable[..., object]) -> Callable[..., object]:
            def change(*a: object, **k: object) -> object:
                if not swapping[0]:
                    return fn(*a, **k)
                seen[0] += 1
                if seen[0] == op and when == "before":
                    os.kill(os.getpid(), signal.SIGKILL)
                result = fn(*a, **k)
                print(f"op {seen[0]}: {name} -> {result!r}", flush=True)
                if seen[0] == op and when == "after":
                    os.kill(os.getpid(), signal.SIGKILL)
                return result
            return change

        for name in ("rename", "replace", "unlink", "remove", "rmdir"):
            setattr(os, name, counted(name, getattr(os, name)))
        outdir._exchange = counted("exchange", outdir._exchange)
        swap_in = outdir._swap_in

        def swap(*a: object, **k: object) -> bool:
            swapping[0] = True
            return swap_in(*a, **k)

        outdir._swap_in = swap
        transform.main(args, prog_name="revffn-transform")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.stdout.flush()
        os._exit(code)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="renameat2(RENAME_EXCHANGE) is Linux's")
def test_sigkill_around_the_linux_exchange(old_export: Path, new_export: Path,
                                           tmp_path: Path) -> None:
    """The swap users run on Linux (the atomic exchange on; the pause points turn it off):
    --force over a good OUT_DIR, SIGKILLed right before the exchange, right after it, and
    after the rename that follows. OUT_DIR is the old or the new export bit for bit and
    loads; the leftovers are the killed run's and recovery removes them. A swap that
    deleted OUT_DIR and then renamed the new one in would be caught half deleted."""
    old, new = _digest(old_export), _digest(new_export)
    kills = {(1, "before"): old, (1, "after"): new, (2, "after"): new}
    runs = {}
    for op, when in kills:
        name = f"{when}{op}"
        out = Path(shutil.copytree(old_export, tmp_path / name / "out"))
        runs[op, when] = (out, tmp_path / f"{name}.log", _fork_killed_in_swap(
            [str(TINY), str(out), "--force", "--coupling", "revnet", "--max-shard-size",
             "256KB"], tmp_path / f"{name}.log", op, when))
    for (op, when), (out, log, pid) in runs.items():
        assert _exit_code(pid) == -signal.SIGKILL, log.read_text()
        changes = [ln for ln in log.read_text().splitlines() if ln.startswith("op ")]
        if op == 1 and when == "after" and changes == ["op 1: exchange -> False"]:
            pytest.skip(f"{tmp_path}: this filesystem has no RENAME_EXCHANGE")
        want = kills[op, when]
        assert _digest(out) == want, (op, when, changes)
        assert rf.load(out).coupling == ("revnet" if want is new else "revffn")
        if when == "after":  # the first change of the swap is the exchange, and it ran
            assert changes[0] == "op 1: exchange -> True", changes
        recover(out)  # what the next run does first: the killed run's leftovers go
        assert sorted(p.name for p in out.parent.iterdir()) == ["out", "out.revffn-lock"]
        assert _digest(out) == want


@pytest.mark.slow
def test_sigterm_cleans_up_and_concurrent_writer_refused(old_export: Path,
                                                         tmp_path: Path) -> None:
    # SIGTERM in the middle of the shards: exit 130, staging removed, OUT_DIR untouched
    out = Path(shutil.copytree(old_export, tmp_path / "a" / "out"))
    good = _digest(out)
    mark, first_mark = tmp_path / "term.mark", tmp_path / "first.mark"
    term = _fork_cli([str(TINY), str(out), "--force", "--max-shard-size", "256KB"],
                     tmp_path / "term.log", pause="shard", mark=mark)
    # two writers into one absent OUT_DIR: the first holds the lock while the second runs
    both = tmp_path / "b" / "out"
    first = _fork_cli([str(TINY), str(both)], tmp_path / "first.log", pause="staged",
                      mark=first_mark)
    _wait_for([mark, first_mark], [term, first])
    os.kill(term, signal.SIGTERM)
    second = _fork_cli([str(TINY), str(both)], tmp_path / "second.log")
    assert _exit_code(second) == 2
    assert (tmp_path / "second.log").read_text().strip().splitlines()[-1] == (
        f"error: {both}: another revffn-fx process is writing it (lock {both}.revffn-lock "
        "is held); wait for it to finish")
    first_mark.unlink()  # let the first one finish
    assert _exit_code(first) == 0, (tmp_path / "first.log").read_text()
    assert _exit_code(term) == 130
    assert "error: interrupted" in (tmp_path / "term.log").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"] and _digest(out) == good
    assert sorted(p.name for p in both.parent.iterdir()) == ["out"]
    assert rf.load(both).converted == [0, 1, 2, 3]


def test_missing_optional_dependency_is_named_before_the_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`revffn bench --plot` without matplotlib: exit 2 naming the extra, nothing run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    res = _invoke(main, ["bench", "--synthetic", "tiny", "--layers", "2",
                         "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 2, res.output
    _one_error_line(res, "revffn-fx[bench]")
    assert list(tmp_path.iterdir()) == []


def test_python_api_rejects_bad_layer_specs() -> None:
    from zoo import tiny_model

    for spec in ("5-2", ",", ""):
        with pytest.raises(rf.RevFFNError, match="bad layer spec"):
            rf.transform(tiny_model("mixtral"), layers=spec)
