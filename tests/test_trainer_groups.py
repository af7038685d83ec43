"""FusedOptimizerTrainer keeps the Trainer's weight-decay groups: biases and norm weights
get weight_decay 0, every other trainable parameter args.weight_decay (issue 26)."""

from __future__ import annotations

from typing import Any

import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.training import FusedOptimizerTrainer

WD, LR = 0.1, 1e-2


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """The Trainer's rule, spelt out here rather than asked of the Trainer: biases and
    the layer norms' weights (the only 1-d parameters of these models) are not decayed."""
    return name.endswith(".bias") or "norm" in name or p.ndim == 1


def _trainer(tmp_path: Any) -> tuple[torch.nn.Module, Any]:
    from transformers import TrainingArguments

    # qwen2_moe: q/k/v projections with biases, besides the RMSNorm weights
    rev = rf.transform(tiny_model("qwen2_moe", dtype=torch.float64)).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True,
                             learning_rate=LR, weight_decay=WD, max_grad_norm=0.0,
                             optim="adamw_torch")
    trainer = FusedOptimizerTrainer(model=rev, args=args)
    return rev, trainer.create_optimizer()


def test_weight_decay_groups(tmp_path: Any) -> None:
    rev, fused = _trainer(tmp_path)
    names = dict(rev.named_parameters())
    assert any(n.endswith(".bias") for n in names) and any("norm" in n for n in names)
    for name, p in names.items():
        (group,) = fused.optimizers[p].param_groups
        expected = 0.0 if _no_decay(name, p) else WD
        assert group["weight_decay"] == expected, name


def test_decayed_parameters_shrink_with_zero_gradient(tmp_path: Any) -> None:
    """One fused AdamW step on a zero gradient: only decoupled weight decay moves a
    parameter, p <- p * (1 - lr * wd); biases and norm weights stay as they were."""
    rev, fused = _trainer(tmp_path)
    before = {n: p.detach().clone() for n, p in rev.named_parameters()}
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    (0.0 * rev(ids, labels=ids).loss).backward()
    fused.step()
    with torch.no_grad():
        for name, p in rev.named_parameters():
            expected = before[name] if _no_decay(name, p) else before[name] * (1 - LR * WD)
            torch.testing.assert_close(p, expected, rtol=1e-12, atol=0, msg=name)
