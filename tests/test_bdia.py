"""bdia: the original layers trained with +-gamma of the layer before, exact on the
fixed-point grid with packed side bits, evaluated (and exported) as the original
architecture (docs/quality.md, "bdia")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zoo import RANDOM, tiny_model

import revffn_fx as rf
from revffn_fx.checks.exactness import flat_grads, relative_error
from revffn_fx.errors import RevFFNError
from revffn_fx.runtime.bits import pack_bits, unpack_bits
from revffn_fx.tools.measure_memory import saved_tensor_bytes


def _ids(b: int = 2, s: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "hand"])
def test_generated_backward_is_exact_in_fp64(name: str) -> None:
    model = tiny_model(name, dtype=torch.float64, **({"num_hidden_layers": 4}
                                                     if name != "hand" else {"layers": 4}))
    rev = rf.transform(model, coupling="bdia").train()
    ids = _ids()
    torch.manual_seed(0)
    g_gen, _ = flat_grads(rev, lambda: rev(ids, labels=ids))
    with rev.plain_autograd():
        torch.manual_seed(0)
        g_ref, _ = flat_grads(rev, lambda: rev(ids, labels=ids))
    assert relative_error(g_gen, g_ref) <= 1e-10
    assert rf.verify(rev, ids).ok


@pytest.mark.parametrize("gamma", [0.5, 0.25, 0.125, 0.0625])
def test_gamma_is_drawn_per_sample_and_replayed(gamma: float) -> None:
    """Dropout and gamma's signs replay: the generated backward equals plain autograd from
    the same seed; a different seed draws other signs (another loss)."""
    model = tiny_model("dbrx", dtype=torch.float64, num_hidden_layers=4, **RANDOM["dbrx"])
    rev = rf.transform(model, coupling="bdia", bdia_gamma=gamma).train()
    ids = _ids(4)
    torch.manual_seed(3)
    g_gen, loss = flat_grads(rev, lambda: rev(ids, labels=ids))
    with rev.plain_autograd():
        torch.manual_seed(3)
        g_ref, loss_ref = flat_grads(rev, lambda: rev(ids, labels=ids))
    assert loss == loss_ref and relative_error(g_gen, g_ref) <= 1e-10
    torch.manual_seed(4)
    _, other = flat_grads(rev, lambda: rev(ids, labels=ids))
    assert other != loss


def test_eval_is_the_original_model_bit_for_bit() -> None:
    model = tiny_model("mixtral", num_hidden_layers=4).eval()
    rev = rf.transform(model, coupling="bdia").eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(rev(ids, return_logits=True).logits, model(ids).logits)
    rev.train()  # a training step differs: gamma = +-1/16 mixes in the layer before
    torch.manual_seed(0)
    train_logits = rev(ids, return_logits=True).logits.detach()
    with torch.no_grad():
        assert not torch.allclose(train_logits, model(ids).logits)


def test_to_original_round_trip(tmp_path: Path) -> None:
    """A trained bdia model as the original class: saved without auto_map, loaded by
    AutoModelForCausalLM with no revffn-fx, same eval logits."""
    from transformers import AutoModelForCausalLM

    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=3), coupling="bdia").train()
    opt = torch.optim.SGD(rev.parameters(), lr=0.5)
    ids = _ids()
    rev(ids, labels=ids).loss.backward()
    opt.step()
    rev.eval()
    want = rev(ids, return_logits=True).logits
    rev.to_original().save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "auto_map" not in config and "revffn" not in config
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)


@pytest.mark.parametrize("coupling", ["revffn", "revnet", "momentum", "meft"])
def test_to_original_refuses_other_functions(coupling: str) -> None:
    rev = rf.transform(tiny_model("mixtral"), coupling=coupling)
    with pytest.raises(RevFFNError, match="computes another function"):
        rev.to_original()


@pytest.mark.slow
def test_export_original_cli(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"
    run = [sys.executable, "-m", "revffn_fx"]
    subprocess.run([*run, "transform", str(example), str(tmp_path / "rev"), "--coupling",
                    "bdia"], check=True, capture_output=True, timeout=300)
    subprocess.run([*run, "export-original", str(tmp_path / "rev"), str(tmp_path / "hf")],
                   check=True, capture_output=True, timeout=300)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    orig = AutoModelForCausalLM.from_pretrained(example).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, orig(ids).logits)  # untrained: the original
    subprocess.run([*run, "transform", str(example), str(tmp_path / "mom"), "--coupling",
                    "momentum"], check=True, capture_output=True, timeout=300)
    bad = subprocess.run([*run, "export-original", str(tmp_path / "mom"),
                          str(tmp_path / "hf2")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "computes another function" in bad.stderr
    assert not (tmp_path / "hf2").exists()


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_packed_bits_round_trip(k: int) -> None:
    v = torch.randint(0, 2 ** k, (3, 5, 7))
    packed = pack_bits(v, k)
    assert packed.dtype == torch.uint8 and packed.numel() == k * 14  # 105 -> 14 bytes a plane
    assert torch.equal(unpack_bits(packed, k, v.shape), v.int())


@pytest.mark.parametrize(("coupling", "option", "per_element"), [
    ("bdia", {"bdia_gamma": 0.5}, 1 / 8),       # one bit per element per layer
    ("bdia", {"bdia_gamma": 0.125}, 3 / 8),
    ("bdia", {}, 4 / 8),                        # the default, gamma 1/16
    ("momentum", {"momentum": 0.125}, 2 * 3 / 8),  # two scaled updates of 3 bits
])
def test_saved_side_bytes_per_layer(coupling: str, option: dict, per_element: float) -> None:
    """What the stored bits cost: bdia at gamma 1/2 <= 0.13 bytes per element per layer,
    momentum at g = 1/8 <= 0.75 (a bf16 checkpoint boundary: 2 bytes)."""
    ids = _ids(2, 32)

    def saved(layers: int) -> int:
        rev = rf.transform(tiny_model("mixtral", num_hidden_layers=layers), coupling=coupling,
                           **option).train()
        return saved_tensor_bytes(lambda: rev(ids, labels=ids).loss)[0]

    per_layer = (saved(4) - saved(2)) / 2 / (ids.numel() * 64)  # hidden 64
    assert per_layer == pytest.approx(per_element)


def test_an_export_is_not_a_model_dir(tmp_path: Path) -> None:
    """Transforming (or loading as a plain model) a function-changing export is refused
    with what to do, not transformers' "custom code" message; rf.load reads it."""
    rev = rf.transform(tiny_model("mixtral"), coupling="revnet")
    rev.save_pretrained(tmp_path / "out")
    with pytest.raises(RevFFNError, match="a revffn-fx export .the revnet coupling.*rf.load"):
        rf.load_model(tmp_path / "out")
    with pytest.raises(RevFFNError, match="start from the original model directory"):
        rf.transform_dir(tmp_path / "out", tmp_path / "again")
    assert rf.load(tmp_path / "out").coupling == "revnet"
