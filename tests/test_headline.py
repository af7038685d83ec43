"""The exact mode (coupling "none") and the whole-step headline benchmark (bench --step)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx import cli
from revffn_fx.runtime.stack import Checkpointed
from revffn_fx.training import fuse_optimizer

ROOT = Path(__file__).resolve().parents[1]
EXACT_ARCHS = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "granitemoe"]


def _ids(vocab: int = 128, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, vocab, (2, seq), generator=torch.Generator().manual_seed(5))


def _grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


# -- exact mode -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EXACT_ARCHS)
def test_exact_mode_is_the_same_function(name: str) -> None:
    model = tiny_model(name)
    rev = rf.transform(model, coupling="none")
    ids = _ids()
    model.eval()
    rev.eval()
    with torch.no_grad():  # eval: logits bit for bit, with and without gradients
        assert torch.equal(rev(ids).logits, model(ids).logits)
    assert torch.equal(rev(ids).logits, model(ids).logits)
    model.train()
    rev.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in rev.parameters()} == {id(p) for p in params}  # nothing added
    torch.manual_seed(0)  # routers with jitter draw the same noise in both
    ref = model(ids, labels=ids, use_cache=False).loss
    g_ref = _grads(ref, params)
    torch.manual_seed(0)
    out = rev(ids, labels=ids)
    assert out.logits is None  # the lean head ran
    assert rev.loss_head_status == "chunked"
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(out.loss, params), g_ref):
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))


def test_exact_mode_checkpoints_every_layer_and_keeps_less() -> None:
    from revffn_fx.tools.measure_memory import saved_tensor_bytes

    model = tiny_model("mixtral", num_hidden_layers=4)
    rev = rf.transform(model, coupling="none").train()
    gm = rev.graph(True, False, True, chunked_head=True)
    assert sum(isinstance(m, Checkpointed) for m in gm.modules()) == 4
    assert rev.converted == [] and rev.is_gradient_checkpointing
    ids = _ids(seq=64)
    plain = saved_tensor_bytes(lambda: model(ids, labels=ids, use_cache=False).loss)[0]
    exact = saved_tensor_bytes(lambda: rev(ids, labels=ids).loss)[0]
    assert exact < plain / 4, (exact, plain)
    rev.activation_checkpointing_disable()  # the ablation: lean head only
    gm = rev.graph(True, False, True, chunked_head=True)
    assert not any(isinstance(m, Checkpointed) for m in gm.modules())


@pytest.mark.parametrize("optim", [torch.optim.SGD, torch.optim.AdamW])
def test_exact_mode_with_the_fused_optimizer_steps_like_the_optimizer(optim: type) -> None:
    # SGD is linear in the gradient: the steps agree to rounding. AdamW divides by the
    # gradient's root mean square, which turns rounding in a near-zero gradient into a
    # visible difference of that one element: compared loosely (a few % of lr)
    kw, tol = (dict(lr=0.1, momentum=0.9), 1e-6) if optim is torch.optim.SGD \
        else (dict(lr=1e-3), 2e-4)
    ids = _ids()
    finals = []
    for fused in (False, True):
        model = tiny_model("qwen2_moe")
        if fused:
            rev = rf.transform(model, coupling="none").train()
            opt = fuse_optimizer(rev, optim, **kw)
            for _ in range(2):
                rev(ids, labels=ids).loss.backward()
                opt.step()
            assert all(p.grad is None for p in rev.parameters())  # freed as they arrived
            opt.remove()
        else:
            model.train()
            opt = optim(model.parameters(), **kw)
            for _ in range(2):
                model(ids, labels=ids, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad()
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    start = list(tiny_model("qwen2_moe").parameters())
    assert all(not torch.equal(a, s) for a, s in zip(finals[1], start))  # every one stepped


def test_exact_mode_saves_loads_and_converts_from_the_command_line(tmp_path: Path) -> None:
    model = tiny_model("mixtral").eval()
    rev = rf.transform(model, coupling="none")
    rev.save_pretrained(tmp_path / "api")
    back = rf.load(tmp_path / "api")
    assert back.coupling == "none" and back.converted == [] and back.checkpoint_rest
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    res = CliRunner().invoke(cli.transform_main, [str(ROOT / "examples" / "tiny-mixtral"),
                                                  str(tmp_path / "cli"), "--coupling", "none"])
    assert res.exit_code == 0, res.output
    assert "exact mode" in res.output
    assert rf.load(tmp_path / "cli").coupling == "none"


def test_exact_mode_refuses_a_layer_selection() -> None:
    with pytest.raises(rf.RevFFNError, match="exact mode"):
        rf.transform(tiny_model("mixtral"), coupling="none", layers="0")


# -- the whole-step benchmark -----------------------------------------------------------------

def test_presets_have_the_real_shapes_and_narrow_consistently() -> None:
    from revffn_fx.tools.bench_models import preset_config

    q = preset_config("qwen1.5-moe-shaped")
    assert (q.hidden_size, q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size,
            q.shared_expert_intermediate_size, q.vocab_size) == (2048, 60, 4, 1408, 5632,
                                                                 151936)
    small = preset_config("qwen1.5-moe-shaped", layers=3, hidden=256)
    assert (small.num_hidden_layers, small.hidden_size, small.moe_intermediate_size,
            small.shared_expert_intermediate_size, small.num_experts, small.vocab_size) == (
        3, 256, 176, 704, 60, 151936)
    assert small.hidden_size // small.num_attention_heads == 128  # head size kept
    assert preset_config("mixtral-shaped", hidden=256).vocab_size == 32000
    d = preset_config("deepseek-v3-shaped", layers=2, hidden=256)
    assert d.first_k_dense_replace == 1 and d.n_routed_experts == 256


@pytest.mark.slow
def test_step_bench_splits_what_each_part_contributes() -> None:
    from revffn_fx.tools.bench_models import preset_config
    from revffn_fx.tools.step_bench import run_step_bench

    config = preset_config("mixtral-shaped", layers=2, hidden=64, vocab=4096)
    methods = ["sft", "ckpt", "exact", "revffn", "revffn/no-head", "revffn/no-fusion"]
    res = run_step_bench(config, batch=2, seq=64, methods=methods, repeats=0)
    rows = {r.method: r for r in res.rows}
    assert not [r.error for r in res.rows if r.error]
    ckpt = rows["ckpt"]
    assert ckpt.ratio["peak"] == 1.0
    assert rows["sft"].peak_bytes > ckpt.peak_bytes  # activations kept
    # fused AdamW: the gradients never all exist (at most the head's, computed in forward,
    # and a layer's)
    for m in ("exact", "revffn"):
        assert rows[m].gradients < rows[m].parameters / 2, m
    # not fused: the peak is at the end of the backward, every gradient there
    assert rows["revffn/no-fusion"].gradients >= rows["revffn/no-fusion"].parameters * 0.9
    # the full stacks and the exact mode lie below the paper's baseline
    for m in ("exact", "revffn"):
        assert rows[m].peak_bytes < 0.9 * ckpt.peak_bytes, m
    # the lean head: 2 x 64 tokens x vocab 4096 of fp32 logits (2 MiB), their log-softmax
    # and gradient are what the original head adds on top
    assert rows["revffn/no-head"].peak_bytes > rows["revffn"].peak_bytes + 2 * 2 ** 20
    assert rows["revffn"].head_chunk is not None and rows["ckpt"].head_chunk is None
    # revffn plan counts the same step: within 10% of the measured peaks
    from revffn_fx.tools.memory_plan import memory_plan

    plan = {(r.method, r.fused): r.total for r in memory_plan(config, 2, 64)}
    for m, key in (("sft", ("plain fine-tuning", False)),
                   ("ckpt", ("gradient checkpointing", False)),
                   ("exact", ("exact mode", True)),
                   ("revffn", ("reversible + lean loss head", True)),
                   ("revffn/no-fusion", ("reversible + lean loss head", False))):
        assert abs(plan[key] / rows[m].peak_bytes - 1) <= 0.10, (m, plan[key],
                                                                rows[m].peak_bytes)


@pytest.mark.slow
def test_bench_step_cli_writes_json_and_plot(tmp_path: Path) -> None:
    import json

    from revffn_fx.cli_bench import bench_command

    out, png = tmp_path / "s.json", tmp_path / "s.png"
    res = CliRunner().invoke(bench_command, [
        "--synthetic", "mixtral-shaped", "--step", "--hidden", "32", "--vocab", "512",
        "--layers", "1", "--batch", "1", "--seq", "16", "--repeats", "1",
        "--methods", "ckpt,revnet", "--json", str(out), "--plot", str(png)],
        standalone_mode=False)
    assert res.exit_code == 0, res.output
    assert "revnet" in res.output and "/ckpt" in res.output
    data = json.loads(out.read_text())["results"]
    assert [d["layers"] for d in data] == [1]
    assert all(r["peak_bytes"] > 0 and r["step_s"] > 0 for d in data for r in d["rows"])
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, needle", [
    (("--synthetic", "nope", "--step"), "unknown synthetic model"),
    (("--synthetic", "tiny", "--step", "--methods", "ckpt,foo"), "unknown method"),
    (("--synthetic", "mixtral-shaped", "--step", "--hidden", "20"), "multiple of 16"),
])
def test_bench_step_bad_input_exits_2(args: tuple[str, ...], needle: str) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "revffn_fx", "bench", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_child_process_entry_reports_rss_and_the_tracker(capsys: pytest.CaptureFixture) -> None:
    # what ``isolate=True`` runs in each child process (here in-process: the RSS figure is
    # then only a smoke test), one JSON line out
    import json

    from revffn_fx.tools.bench_models import preset_config
    from revffn_fx.tools.step_bench import _child_main

    config = preset_config("mixtral-shaped", layers=1, hidden=32, vocab=512)
    _child_main(json.dumps(dict(config=config.to_dict(), batch=1, seq=16, dtype="float32",
                                device="cpu", repeats=0, seed=0, method="ckpt")))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["error"] is None and row["peak_bytes"] > 0
    assert row["rss_peak_bytes"] is not None
