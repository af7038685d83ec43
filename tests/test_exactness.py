"""Exact where users train: the generated backward against float64 of the same function,
by the criterion of checks/exactness.py, for every coupling in bf16 and fp32 at 4 and 24
layers; the run-time guard; torch.compile; and the refusals of settings that cannot meet it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.checks.exactness import exactness, flat_grads, relative_error, tolerance
from revffn_fx.options import COUPLINGS


def _ids(b: int = 2, s: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_criterion() -> None:
    assert tolerance(0.01, torch.bfloat16) == pytest.approx(0.03)
    assert tolerance(0.1, torch.bfloat16) == pytest.approx(0.15)
    assert tolerance(0.0, torch.float64) == pytest.approx(1e-9)


@pytest.mark.parametrize("layers", [4, pytest.param(24, marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_defaults_meet_the_criterion(coupling: str, dtype: torch.dtype, layers: int) -> None:
    """With rf.transform's defaults the generated backward is as exact as autograd of the
    same function in that dtype (before the stream rule: revffn 0.18, momentum 0.80 in bf16
    on the shipped model, against autograd's 0.004-0.02)."""
    model = tiny_model("mixtral", dtype=dtype, num_hidden_layers=layers)
    rev = rf.transform(model, coupling=coupling).train()
    e = exactness(rev, _ids())
    assert e.ok, str(e)


@pytest.mark.parametrize("gamma", [0.125, 0.0625])
def test_bdia_small_gammas_meet_the_criterion_in_bf16(gamma: float) -> None:
    """The gammas that fine-tune best (docs/quality.md) store 3-4 bits per element: their
    reconstruction is as exact in bf16 as the other gammas'."""
    model = tiny_model("mixtral", dtype=torch.bfloat16, num_hidden_layers=4)
    rev = rf.transform(model, coupling="bdia", bdia_gamma=gamma).train()
    e = exactness(rev, _ids())
    assert e.ok, str(e)


def test_the_shipped_model_in_bf16() -> None:
    """The pretrained example (large gains, where wrong reconstructions showed first)."""
    from pathlib import Path

    d = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe-stdlib"
    ids = _ids(2, 32, vocab=4096)
    for coupling in ("revffn", "momentum"):
        rev = rf.transform(rf.load_model(d, dtype=torch.bfloat16), coupling=coupling).train()
        e = exactness(rev, ids)
        assert e.ok and e.gen < 0.05, (coupling, str(e))


def test_verify_uses_the_criterion() -> None:
    """rf.verify passes a correct bf16 backward (absolute tolerances failed it) and fails
    one whose recompute is broken (the RNG replay switched off under dropout)."""
    from contextlib import contextmanager

    from revffn_fx.runtime import function

    model = tiny_model("dbrx", dtype=torch.bfloat16, num_hidden_layers=4, resid_pdrop=0.1)
    rev = rf.transform(model, coupling="revnet")
    report = rf.verify(rev, _ids())
    assert report.ok and report.grad_tol >= 0.02, report.summary()
    assert "against float64 of the same function" in report.summary()

    @contextmanager
    def no_replay(state: object):
        yield

    orig = function.rng.replay
    function.rng.replay = no_replay
    try:
        bad = rf.verify(rev, _ids())
    finally:
        function.rng.replay = orig
    assert not bad.ok, bad.summary()


def _step_between(rev: rf.RevModel, ids: torch.Tensor) -> None:
    """A forward, then the weights change (an optimizer step too early), then backward."""
    out = rev(ids, labels=ids)
    with torch.no_grad():  # the decoder layers' weights (only the stacks hold them)
        for p in rev.model.model.layers.parameters():
            p.mul_(1.1)
    out.loss.backward()


@pytest.mark.parametrize("coupling", ["revffn", "revnet", "momentum", "meft"])
def test_guard_names_the_layer(coupling: str) -> None:
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=3), coupling=coupling).train()
    ids = _ids()
    rev(ids, labels=ids).loss.backward()  # no false alarm on a correct backward
    with pytest.raises(rf.ReconstructionError, match=r"layer model\.layers\.\d: the input "
                       r"reconstructed in the backward differs"):
        _step_between(rev, ids)


def test_guard_warn_and_off() -> None:
    ids = _ids()
    rev = rf.transform(tiny_model("mixtral"), coupling="revnet", guard="warn").train()
    with pytest.warns(UserWarning, match="differs from the forward's"):
        _step_between(rev, ids)
    rev = rf.transform(tiny_model("mixtral"), coupling="revnet", guard="off").train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _step_between(rev, ids)


def test_guard_cost_is_a_few_numbers_per_sequence() -> None:
    """What the guard keeps: (streams x 9) float64 per sample and layer, not a boundary."""
    from revffn_fx.runtime.guard import fingerprint

    x = torch.randn(4, 512, 64)
    fp = fingerprint([x, x])
    assert fp.shape == (4, 2, 9) and fp.numel() * 8 < x.numel() * 4 / 100  # < 1% of one


@pytest.mark.slow
def test_compile_gives_the_eager_gradients() -> None:
    """torch.compile (inductor) of a RevModel: the reversible run is opaque to it (a graph
    break), so the stacks run the kernels their backward recomputes with. Mixtral fp32,
    momentum with exact streams: 1.5e-7 from eager with the break (the HF loss upcasts
    logits to fp32, which inductor rounds its own way), 9.8e-6 without it."""
    from revffn_fx.runtime import function

    assert getattr(function.run_reversible, "_torchdynamo_disable", False)
    model = tiny_model("mixtral", num_hidden_layers=2)
    ids = _ids()
    rev = rf.transform(model, coupling="momentum").train()
    g_eager, _ = flat_grads(rev, lambda: rev(ids, labels=ids))
    compiled = torch.compile(rev, backend="inductor")
    g_comp, _ = flat_grads(rev, lambda: compiled(ids, labels=ids))
    assert relative_error(g_comp, g_eager) <= 1e-6


def _trainer_losses(model: torch.nn.Module, tmp: str) -> tuple[list[float], dict]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    losses: list[float] = []

    class Log(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (8, 24), generator=g)
    rows = []
    for k, x in enumerate(ids):  # padded labels: the count of items matters
        y = x.clone()
        y[: 2 + k % 5] = -100
        rows.append({"input_ids": x, "labels": y})
    args = TrainingArguments(output_dir=tmp, max_steps=2, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-1, optim="sgd",
                             lr_scheduler_type="constant", use_cpu=True, report_to=[],
                             save_strategy="no", logging_steps=1, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Log()]).train()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_exact_mode_is_the_original_model(tmp_path) -> None:  # noqa: ANN001
    """Trainer with gradient accumulation: the exact mode logs the original model's losses
    and trains it to the same weights (it counted items without the causal shift: 10.88 /
    10.58 logged where the original logs 11.05 / 10.75)."""
    want, w_orig = _trainer_losses(tiny_model("mixtral", num_hidden_layers=2), str(tmp_path))
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=2), coupling="none")
    got, w_rev = _trainer_losses(rev, str(tmp_path))
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    for name, value in w_orig.items():
        assert torch.allclose(w_rev["model." + name], value, atol=1e-6), name


@pytest.mark.parametrize("coupling", ["momentum", "revffn", "none"])
def test_exports_never_pass_for_the_plain_class(coupling: str, tmp_path) -> None:  # noqa: ANN001
    """A function-changing export does not load as the plain architecture (it computed
    another function: logits off by 3.0); the exact mode's does, computing the same."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral", num_hidden_layers=2)
    rev = rf.transform(model, coupling=coupling).eval()
    rev.save_pretrained(tmp_path / "out")
    ids = _ids()
    want = rev(ids, return_logits=True).logits
    if coupling == "none":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert torch.allclose(plain(ids).logits, want, atol=1e-5)
        return
    with pytest.raises((ValueError, OSError), match="trust_remote_code|revffn"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert isinstance(remote, rf.RevModel) and remote.coupling == coupling
    assert torch.equal(remote(ids, return_logits=True).logits, want)
    assert torch.equal(rf.load(tmp_path / "out")(ids, return_logits=True).logits, want)
