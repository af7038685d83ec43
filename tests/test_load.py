"""load_model: the happy path offline, and one clear LoadError per way a directory breaks."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from revffn_fx.errors import LoadError
from revffn_fx.frontend.loading import load_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = EXAMPLES / "tiny-mixtral"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A writable copy of the shipped tiny model."""
    return Path(shutil.copytree(TINY, tmp_path / "tiny"))


def _make_tiny_model():
    path = EXAMPLES / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _edit_config(model_dir: Path, **changes: object) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))


def _edit_weights(model_dir: Path, edit) -> None:
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _raises(model_dir: Path, *patterns: str) -> str:
    with pytest.raises(LoadError) as info:
        load_model(model_dir)
    message = str(info.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


def test_loads_shipped_tiny_model_offline_with_the_generating_weights() -> None:
    model = load_model(TINY)
    reference = _make_tiny_model().build()
    assert not model.training
    assert model.config.model_type == "mixtral"
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_dtype_is_applied() -> None:
    model = load_model(TINY, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64


def test_registry_load_kwargs_are_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    import revffn_fx.frontend.loading
    from revffn_fx.frontend.registry import ArchFacts, facts_for

    assert load_model(TINY).config._attn_implementation != "eager"
    assert facts_for("gpt_oss").load_kwargs == {"attn_implementation": "eager"}
    seen: list[str | None] = []

    def fake_facts_for(model_type: str | None) -> ArchFacts:
        seen.append(model_type)
        return ArchFacts(load_kwargs={"attn_implementation": "eager"})

    monkeypatch.setattr(revffn_fx.frontend.loading, "facts_for", fake_facts_for)
    assert load_model(TINY).config._attn_implementation == "eager"
    assert seen == ["mixtral"]


def test_missing_path(tmp_path: Path) -> None:
    _raises(tmp_path / "nope", re.escape(str(tmp_path / "nope")), "no such directory", "local")


def test_not_a_directory(tiny: Path) -> None:
    _raises(tiny / "config.json", "config.json: not a directory")


def test_no_config(tiny: Path) -> None:
    (tiny / "config.json").unlink()
    _raises(tiny, re.escape(str(tiny / "config.json")), "missing")


def test_config_not_json(tiny: Path) -> None:
    text = '{\n  "model_type": "mixtral",\n  "hidden_size": 64\n  "x": 1\n}\n'
    (tiny / "config.json").write_text(text)
    _raises(tiny, r"config\.json: not valid JSON: line 4 column 3")


def test_unknown_model_type(tiny: Path) -> None:
    _edit_config(tiny, model_type="mixtral_v9")
    _raises(tiny, r"config\.json: unknown model_type 'mixtral_v9'", r">=5\.20,<5\.40", "mixtral")


def test_no_weights(tiny: Path) -> None:
    (tiny / "model.safetensors").unlink()
    _raises(tiny, re.escape(str(tiny)), "no weights", r"model\.safetensors", r"pytorch_model\.bin")


def test_weights_do_not_fit_config(tiny: Path) -> None:
    _edit_config(tiny, vocab_size=128)
    _raises(tiny, r"model\.safetensors: weights do not fit config\.json",
            r"lm_head\.weight", r"\[256, 64\]", r"\[128, 64\]")


def test_expert_weights_do_not_fit_config(tiny: Path) -> None:
    _edit_config(tiny, intermediate_size=96)
    _raises(tiny, r"model\.safetensors: weights do not fit",
            r"model\.layers\.0\.mlp\.experts\.down_proj",
            r"\[4, 64, 128\] in the checkpoint but \[4, 64, 96\] in the model")


def test_one_expert_has_another_shape(tiny: Path) -> None:
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    _edit_weights(tiny, lambda t: t.update({name: torch.zeros(100, 64)}))
    _raises(tiny, r"model\.safetensors: weights do not fit", re.escape(name), r"\[100, 64\]",
            r"\[128, 64\]")


def test_missing_tensor(tiny: Path) -> None:
    _edit_weights(tiny, lambda t: t.pop("model.norm.weight"))
    _raises(tiny, r"model\.safetensors: weights do not fit", r"model\.norm\.weight")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors(tiny: Path, damage: str) -> None:
    file = tiny / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a tensor" * 8)
    _raises(tiny, re.escape(str(file)), "truncated or corrupted")


def test_index_names_a_missing_shard(tiny: Path) -> None:
    keys = load_file(tiny / "model.safetensors").keys()
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in keys}}
    (tiny / "model.safetensors").unlink()
    (tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(tiny, r"model\.safetensors\.index\.json: lists shard model-00001-of-00002", "missing")
