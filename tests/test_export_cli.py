"""revffn-transform through the installed console script, and fine-tuning an exported
model with transformers.Trainer (save and resume included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_export import ERRORS
from zoo import tiny_model

import revffn_fx as rf

SCRIPT = Path(sys.executable).parent / "revffn-transform"
# a missing console script is a broken install: the tests using it fail, they do not skip


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "mixtral"
    tiny_model("mixtral").save_pretrained(src)
    return src


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("case,damage,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_console_script_errors(case: str, damage: Any, exc: type, message: str, source: Path,
                               tmp_path: Path) -> None:
    src = _copy(source, tmp_path / "src")
    damage(src)
    out = tmp_path / "out"
    res = _run(str(src), str(out))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not out.exists()


@pytest.mark.slow
def test_console_script_out_dir_errors(source: Path, tmp_path: Path) -> None:
    src = _copy(source, tmp_path / "src")
    res = _run(str(src), str(src / "inside"))
    assert res.returncode == 2 and "inside" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (src / "inside").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    res = _run(str(src), str(busy))
    assert res.returncode == 2 and "--force" in res.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]  # untouched
    res = _run(str(src), str(tmp_path / "ok"))
    assert res.returncode == 0, res.stderr
    assert "converted 2 of 2 layers" in res.stdout


class _Repeat(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i % 4))
        return {"input_ids": ids, "labels": ids}


def _train(model_dir: Path, out: Path, steps: int, resume: str | None = None) -> list[float]:
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    rev = rf.load(model_dir)
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, save_steps=2,
                             save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=rev, args=args, train_dataset=_Repeat())
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.slow
def test_trainer_fine_tunes_an_exported_model(source: Path, tmp_path: Path) -> None:
    exported = tmp_path / "rev"
    rf.transform_dir(source, exported)
    full = _train(exported, tmp_path / "run", steps=6)
    assert len(full) == 6 and full[-1] < full[0]
    # the Trainer's own checkpoint resumes the same run
    cont = _train(exported, tmp_path / "run", steps=6,
                  resume=str(tmp_path / "run" / "checkpoint-4"))
    assert cont[-2:] == pytest.approx(full[4:], rel=1e-5)
