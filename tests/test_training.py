"""Fine-tuning: the two-stage callback, examples/finetune.py, the shipped pretrained model."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.training.two_stage import TwoStageCallback

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PRETRAINED = EXAMPLES / "tiny-moe-stdlib"


def _data(n: int = 16, seq: int = 12, vocab: int = 128) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


class _Spy(TrainerCallback):
    """Snapshots requires_grad flags and parameter values after every optimizer step."""

    def __init__(self) -> None:
        self.flags: dict[int, dict[str, bool]] = {}
        self.values: dict[int, dict[str, torch.Tensor]] = {}
        self.lrs: dict[int, float] = {}

    def snap(self, step: int, model: torch.nn.Module) -> None:
        self.flags[step] = {n: p.requires_grad for n, p in model.named_parameters()}
        self.values[step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kw: Any) -> None:
        self.snap(0, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    optimizer: Any = None, **kw: Any) -> None:
        self.snap(state.global_step, model)
        self.lrs[state.global_step] = optimizer.param_groups[0]["lr"]


def _train(model: torch.nn.Module, cb: TwoStageCallback, tmp_path: Path,
           steps: int = 4) -> _Spy:
    spy = _Spy()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             weight_decay=0.01)
    Trainer(model=model, args=args, train_dataset=_data(), callbacks=[cb, spy]).train()
    return spy


def _changed(spy: _Spy, a: int, b: int, name: str) -> bool:
    return not torch.equal(spy.values[a][name], spy.values[b][name])


@pytest.fixture(scope="module", autouse=True)
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than 2 on a shared, busy machine
    yield
    torch.set_num_threads(before)


def test_two_stage_freezes_then_unfreezes(tmp_path: Path) -> None:
    rev = rf.transform(tiny_model("mixtral"), coupling="revffn").train()
    cb = TwoStageCallback(warmup_steps=2, warmup_lr=5e-2, full_lr=1e-2)
    spy = _train(rev, cb, tmp_path)
    names = [n for n, _ in rev.named_parameters()]
    new = [n for n in names if n.startswith("adapters.")]
    old = [n for n in names if not n.startswith("adapters.")]
    assert new and old
    # during the warm-up (steps 1-2) only the adapters train; the base is frozen
    assert all(spy.flags[1][n] for n in new) and not any(spy.flags[1][n] for n in old)
    assert all(_changed(spy, 0, 2, n) for n in new)
    assert not any(_changed(spy, 0, 2, n) for n in old)
    assert spy.lrs[1] == pytest.approx(5e-2)
    # unfrozen at the end of step 2; steps 3-4 update every parameter that gets a gradient
    assert cb.stage == "full" and cb.switched_at == 2
    assert all(spy.flags[2][n] for n in names)
    assert spy.lrs[3] == pytest.approx(1e-2)
    unused = {n for n in old if "embed_tokens" in n}  # rows of unseen tokens stay put
    moved = [n for n in old if _changed(spy, 2, 4, n)]
    assert set(old) - set(moved) <= unused, sorted(set(old) - set(moved) - unused)
    assert all(_changed(spy, 2, 4, n) for n in new)


def test_two_stage_adds_params_missing_from_optimizer(tmp_path: Path) -> None:
    rev = rf.transform(tiny_model("mixtral"), coupling="revffn").train()
    frozen = [p for n, p in rev.named_parameters() if "lm_head" in n]
    for p in frozen:  # frozen before the Trainer builds its optimizer: not in it
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    cb = TwoStageCallback(warmup_steps=1)

    class _Include(TrainerCallback):
        def on_train_begin(self, *a: Any, **kw: Any) -> None:
            for p in frozen:  # the user asks for them to be trained in stage 2
                p.requires_grad_(True)

    spy = _Spy()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=rev, args=args, train_dataset=_data(),
            callbacks=[_Include(), cb, spy]).train()
    assert cb.stage == "full"
    assert all(not torch.equal(b, p) for b, p in zip(before, frozen))


def test_two_stage_skips_warmup_without_new_params(tmp_path: Path) -> None:
    rev = rf.transform(tiny_model("mixtral"), coupling="revnet").train()
    cb = TwoStageCallback(warmup_steps=2)
    spy = _train(rev, cb, tmp_path, steps=1)
    assert cb.stage == "full"
    assert all(spy.flags[1].values())


def test_two_stage_with_trl_sft_trainer(tmp_path: Path) -> None:
    """The callback under TRL's SFTTrainer (on a plain HF model: TRL 1.16 patches the
    model's forward with a fused LM head that needs a ``base_model`` backbone, which a
    RevModel does not expose)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PRETRAINED)
    model = tiny_model("mixtral").train()
    model.resize_token_embeddings(len(tok))
    rows = [json.loads(line) for line in
            (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()[:16]]
    cb = TwoStageCallback(warmup_steps=1, is_new=lambda n: "lm_head" in n)
    spy = _Spy()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                         use_cpu=True, report_to=[], save_strategy="no",
                         activation_checkpointing=False, disable_tqdm=True, learning_rate=1e-2)
    trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=tok, callbacks=[cb, spy]).train()
    assert cb.stage == "full" and cb.switched_at == 1
    layer = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(spy.values[0][layer], spy.values[1][layer])  # frozen in step 1
    assert not torch.equal(spy.values[1][layer], spy.values[2][layer])  # trained in step 2


def test_rev_model_under_trl_sft_trainer(tmp_path: Path) -> None:
    """SFTTrainer patches the model's forward with a fused LM head that runs
    ``model.base_model`` (RevModel.backbone: the reversible stacks, no head). The
    two-stage callback then freezes all but the adapters for one step, and the router
    receives the load-balancing loss's gradient."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(PRETRAINED)
    rev = rf.transform(rf.load_model(PRETRAINED, experts_implementation="eager")).train()
    rows = [json.loads(line) for line in
            (EXAMPLES / "data" / "train.jsonl").read_text().splitlines()[:16]]
    cb = TwoStageCallback(warmup_steps=1)
    spy = _Spy()
    # SFTConfig's defaults ask for activation checkpointing: the layers outside the
    # reversible stacks (none here) get it
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                         use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                         disable_tqdm=True, learning_rate=1e-3)
    trainer = trl.SFTTrainer(model=rev, args=args, processing_class=tok, callbacks=[cb, spy],
                             train_dataset=datasets.Dataset.from_list(rows))
    trainer.train()
    assert rev.is_gradient_checkpointing
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["aux_loss"] > 0 for h in logs), logs
    assert cb.stage == "full" and cb.switched_at == 1
    q, adapter = "model.model.layers.0.self_attn.q_proj.weight", "adapters.0.F_up.weight"
    router = "model.model.layers.3.mlp.gate.weight"
    assert not _changed(spy, 0, 1, q) and _changed(spy, 0, 1, adapter)  # warm-up step
    assert _changed(spy, 1, 2, q) and _changed(spy, 1, 2, router)


def _load_example(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_finetune_script_runs_on_shipped_data(tmp_path: Path) -> None:
    finetune = _load_example("finetune")
    out = tmp_path / "ft"
    result = finetune.main(["--max-steps", "3", "--eval-steps", "2", "--eval-limit", "8",
                            "--batch-size", "4", "--two-stage", "--warmup-steps", "1",
                            "--output-dir", str(out)])
    assert result["steps"] == 3 and 0 <= result["exact_match"] <= 100
    assert any("eval_loss" in r for r in result["history"])
    assert (out / "result.json").is_file()
    back = rf.RevModel.from_pretrained(out / "final")
    assert back.coupling == "revffn"


@pytest.mark.slow
def test_finetune_script_calibrates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    finetune = _load_example("finetune")
    result = finetune.main(["--max-steps", "2", "--eval-steps", "2", "--eval-limit", "8",
                            "--batch-size", "4", "--calibrate", "--no-save",
                            "--output-dir", str(tmp_path / "ft")])
    assert result["steps"] == 2 and any("eval_loss" in r for r in result["history"])
    assert "calibrated 4 layers" in capsys.readouterr().out


def test_shipped_pretrained_model_beats_random(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pretrain = _load_example("pretrain_tiny_moe")
    tok = AutoTokenizer.from_pretrained(PRETRAINED)
    model = rf.load_model(PRETRAINED, experts_implementation="eager")
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32,
                                              experts_implementation="eager").eval()
    _, held_out = pretrain.split_files(pretrain.stdlib_files())
    ids = pretrain.encode(tok, pretrain.read_texts(held_out, 200_000))
    trained = pretrain.eval_loss(model, ids, seq=128, max_windows=16)
    untrained = pretrain.eval_loss(random, ids, seq=128, max_windows=16)
    assert trained < 0.6 * untrained, (trained, untrained)
    size = sum(p.stat().st_size for p in PRETRAINED.iterdir() if p.is_file())
    assert size < 20e6
