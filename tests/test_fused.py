"""The optimizer fused into backward: same parameters as the ordinary optimizers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.training import FusedOptimizerTrainer, fuse_optimizer

OPTS = [(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
        (torch.optim.SGD, dict(lr=1e-1, momentum=0.9))]


def _ids(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(step))


def _pair(rev: bool, tied: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    def make() -> torch.nn.Module:
        m = tiny_model("mixtral", dtype=torch.float64, tie_word_embeddings=tied)
        return (rf.transform(m) if rev else m).train()

    return make(), make()


def _step_both(ref: torch.nn.Module, opt: Any, model: torch.nn.Module, fused: Any,
               step: int) -> None:
    """One step of the ordinary optimizer on ``ref`` and of the fused one on ``model``."""
    ref(_ids(step), labels=_ids(step)).loss.backward()
    opt.step()
    opt.zero_grad()
    model(_ids(step), labels=_ids(step)).loss.backward()
    fused.step()


def _max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        return max(float((p - q).norm() / q.norm().clamp_min(1e-30))
                   for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("rev", [False, True])
@pytest.mark.parametrize("cls,kw", OPTS)
def test_three_steps_match_the_ordinary_optimizer(cls: Any, kw: dict, rev: bool,
                                                  tied: bool) -> None:
    ref, model = _pair(rev, tied)
    start = [p.detach().clone() for p in model.parameters()]
    opt = cls(ref.parameters(), **kw)
    fused = fuse_optimizer(model, cls, **kw)
    delivered: list[int] = []
    if rev:  # count gradients handed over from inside the reversible backward
        sink = model.options.grad_sink
        model.options.grad_sink = lambda p, g: (delivered.append(1), sink(p, g))
    for step in range(3):
        _step_both(ref, opt, model, fused, step)
        assert all(p.grad is None for p in model.parameters())  # freed during backward
    assert _max_rel(model, ref) <= 1e-12
    assert all(not torch.equal(p, s) for p, s in zip(model.parameters(), start))
    if rev:
        assert delivered, "no gradient came from inside the reversible stack"


def test_scheduler_reaches_every_parameter() -> None:
    ref, model = _pair(True, False)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    fused = fuse_optimizer(model, torch.optim.SGD, lr=0.1)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in (opt, fused)]
    for step in range(3):
        _step_both(ref, opt, model, fused, step)
        for s in scheds:
            s.step()
    assert {g["lr"] for g in fused.param_groups} == {opt.param_groups[0]["lr"]}
    assert _max_rel(model, ref) <= 1e-12


def test_accumulation_steps_on_the_last_micro_batch() -> None:
    ref, model = _pair(True, False)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    fused = fuse_optimizer(model, torch.optim.AdamW, lr=1e-2)
    for micro in range(2):
        ref(_ids(micro), labels=_ids(micro)).loss.backward()
    opt.step()
    with fused.accumulating():
        model(_ids(0), labels=_ids(0)).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model(_ids(1), labels=_ids(1)).loss.backward()
    assert _max_rel(model, ref) <= 1e-12


def test_state_dict_round_trip(tmp_path: Any) -> None:
    _, model = _pair(True, False)
    fused = fuse_optimizer(model, torch.optim.AdamW, lr=1e-2)
    model(_ids(0), labels=_ids(0)).loss.backward()
    torch.save(fused.state_dict(), tmp_path / "opt.pt")
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    model(_ids(1), labels=_ids(1)).loss.backward()
    after = [p.detach().clone() for p in model.parameters()]
    # restore both and redo the second step
    model.load_state_dict(snapshot)
    fused.remove()
    fused2 = fuse_optimizer(model, torch.optim.AdamW, lr=1e-2)
    fused2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    model(_ids(1), labels=_ids(1)).loss.backward()
    for p, q in zip(model.parameters(), after):
        assert torch.equal(p, q)


def test_per_parameter_clipping() -> None:
    _, model = _pair(False, False)
    fused = fuse_optimizer(model, torch.optim.SGD, lr=1.0, clip_per_param=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    model(_ids(0), labels=_ids(0)).loss.backward()
    for p, b in zip(model.parameters(), before):
        assert float((p - b).detach().norm()) <= 1e-3 * (1 + 1e-9)
    del fused


class _Repeat(torch.utils.data.Dataset):
    """The same few sequences again and again: the loss curve depends only on the model
    and optimizer state, so a resumed run must continue exactly."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = _ids(i % 2)[0]
        return {"input_ids": ids, "labels": ids}


def _train(out: Any, steps: int, resume: str | None = None) -> list[float]:
    from transformers import TrainingArguments

    torch.manual_seed(0)
    rev = rf.transform(tiny_model("mixtral"))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1,
                             save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                             max_grad_norm=0.0, lr_scheduler_type="linear", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = FusedOptimizerTrainer(model=rev, args=args, train_dataset=_Repeat())
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_with_fused_optimizer(tmp_path: Any) -> None:
    full = _train(tmp_path / "a", steps=6)
    assert len(full) == 6 and full[-1] < full[0]
    # resuming from step 4 restores weights, per-parameter optimizer states and the
    # schedule: the next steps' losses are those of the uninterrupted run
    cont = _train(tmp_path / "a", steps=6, resume=str(tmp_path / "a" / "checkpoint-4"))
    assert cont[-2:] == pytest.approx(full[4:], rel=1e-6)
