"""Export: transform_dir / save_pretrained write a directory that loads back bit for bit.

Tiny models are saved with ``save_pretrained`` into temporary directories (never
downloaded). Every comparison is exact (``torch.equal``): loading replays the transform
and loads the very bytes that were written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.errors import ConversionError, ExportError, LoadError, RevFFNError
from revffn_fx.export import ADAPTER_FILE, SHIM_FILE, load, transform_dir

ROUND_TRIP = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss",
              "granitemoe", "phimoe"]


def _ids(seed: int = 0, batch: int = 2, seq: int = 10) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads cost more than they give (and spin on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint per architecture (built lazily, shared by the module)."""
    root = tmp_path_factory.mktemp("src")
    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            path = root / name
            tiny_model(name).save_pretrained(path)
            cache[name] = path
            self[name] = path
            return path

    return Lazy()


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(name: str, sources: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = sources[name]
    before = _digest(src)
    out = tmp_path / "out"
    summary = transform_dir(src, out)
    assert summary.converted == [0, 1] and summary.params_added > 0
    assert _digest(src) == before  # MODEL_DIR untouched
    assert (out / ADAPTER_FILE).is_file() and (out / SHIM_FILE).is_file()
    shim = (out / SHIM_FILE).read_text()
    assert "from revffn_fx.export import" in shim and "\nclass " not in shim  # no model code
    config = json.loads((out / "config.json").read_text())
    assert config["revffn"]["layers"] == [0, 1] and config["auto_map"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging, no lock left

    ids = _ids()
    ref = rf.transform(rf.load_model(src))
    want = _logits(ref, ids)
    assert torch.equal(_logits(load(out), ids), want)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert isinstance(remote, rf.RevModel)
    assert torch.equal(_logits(remote, ids), want)

    # one training step (reversible backward), then save_pretrained / load: same function
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    ref(ids, labels=ids).loss.backward()
    opt.step()
    tuned = _logits(ref, ids)
    assert not torch.equal(tuned, want)
    ref.save_pretrained(tmp_path / "tuned")
    back = rf.RevModel.from_pretrained(tmp_path / "tuned")
    assert torch.equal(_logits(back, ids), tuned)
    for (k, a), (k2, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def _tiny_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>",
         "bos_token": "<s>", "eos_token": "</s>"}))


def test_sharded_export_with_tokenizer(sources: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src)
    _tiny_tokenizer(src)
    calls: list[tuple[int, int, str]] = []
    out = tmp_path / "out"
    summary = transform_dir(src, out, max_shard_size="64KB",
                            progress=lambda d, n, f: calls.append((d, n, f)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and summary.shards[:-1] == shards
    assert not (out / "model.safetensors").exists()
    with safe_open(src / "model.safetensors", "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())
        biggest = max(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[-1] * 4
                      for k in f.keys())
    for shard in shards:
        assert (out / shard).stat().st_size <= max(64_000, biggest) + 10_000
    assert calls[-1] == (len(shards), len(shards), shards[-1])
    assert [c[0] for c in calls] == list(range(len(shards) + 1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert AutoTokenizer.from_pretrained(out)("w5 w6")["input_ids"] == [5, 6]
    ids = _ids()
    assert torch.equal(_logits(load(out), ids),
                       _logits(rf.transform(rf.load_model(src)), ids))
    # re-saving a loaded model into its own directory keeps it loadable and identical
    rev = load(out)
    rev.save_pretrained(out, max_shard_size="64KB")
    assert torch.equal(_logits(load(out), ids), _logits(rev, ids))


def test_tied_embeddings_revnet_and_layers(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tiny_model("mixtral", tie_word_embeddings=True, num_hidden_layers=3).save_pretrained(src)
    out = tmp_path / "out"
    summary = transform_dir(src, out, coupling="revnet", layers="0,2")
    assert summary.converted == [0, 2] and summary.not_selected == [1]
    assert summary.params_added == 0 and not (out / ADAPTER_FILE).exists()
    ids = _ids()
    want = _logits(rf.transform(rf.load_model(src), coupling="revnet", layers=[0, 2]), ids)
    rev = load(out)
    assert rev.coupling == "revnet" and rev.converted == [0, 2]
    assert torch.equal(_logits(rev, ids), want)
    text = "\n".join(summary.lines())
    assert "converted 2 of 3 layers to revnet couplings: 0,2" in text


def test_dry_run_force_verify(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mixtral"]
    out = tmp_path / "out"
    summary = transform_dir(src, out, dry_run=True)
    assert not out.exists() and summary.dry_run and "nothing written" in summary.lines()[-1]
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        transform_dir(src, out)
    assert (out / "old.txt").exists()
    with pytest.raises(ExportError, match="not written by revffn-fx"):
        transform_dir(src, out, force=True)  # --force replaces only revffn-fx's exports
    summary = transform_dir(src, out, force_foreign=True, verify=True)
    assert not (out / "old.txt").exists() and (out / "config.json").exists()
    assert summary.verify is not None and summary.verify.ok
    assert any(line.startswith("verify: OK") for line in summary.lines())


def test_interrupted_run_leaves_nothing(sources: dict[str, Path], tmp_path: Path) -> None:
    def stop(done: int, total: int, what: str) -> None:
        if done == 1:
            raise KeyboardInterrupt

    out = tmp_path / "deep" / "out"
    with pytest.raises(KeyboardInterrupt):
        transform_dir(sources["mixtral"], out, max_shard_size="64KB", progress=stop)
    assert list(tmp_path.iterdir()) == []


def _truncate(src: Path) -> None:
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _bad_header(src: Path) -> None:
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))


def _edit_config(**changes: object):
    def edit(src: Path) -> None:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        (src / "config.json").write_text(json.dumps(cfg))
    return edit


ERRORS = [
    ("missing_dir", lambda src: os.rename(src, src.with_name("gone")), LoadError,
     "no such directory"),
    ("config_missing", lambda src: (src / "config.json").unlink(), LoadError, "no config.json"),
    ("config_invalid", lambda src: (src / "config.json").write_text("{oops"), LoadError,
     "not valid JSON"),
    ("unknown_arch", _edit_config(model_type="no_such_moe"), LoadError, "unknown model_type"),
    ("weights_missing", lambda src: (src / "model.safetensors").unlink(), LoadError,
     "no weights"),
    ("pickle_only", lambda src: os.rename(src / "model.safetensors", src / "pytorch_model.bin"),
     LoadError, "only safetensors"),
    ("truncated", _truncate, LoadError, "truncated or corrupted"),
    ("corrupted", _bad_header, LoadError, "truncated or corrupted"),
    ("shapes", _edit_config(intermediate_size=80), LoadError, "do not fit config.json"),
]


@pytest.mark.parametrize("case,damage,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_model_dir_errors(case: str, damage, exc: type, message: str,
                          sources: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in sources["mixtral"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    damage(src)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out"
    with pytest.raises(exc, match=message) as info:
        transform_dir(src, out)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging, no lock


def test_no_convertible_layer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tiny_model("minimax").save_pretrained(src)
    with pytest.raises(ConversionError, match="no convertible decoder layer"):
        transform_dir(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_out_dir_errors(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mixtral"]
    before = _digest(src)
    for out, message in [(src, "must not be MODEL_DIR"), (src / "sub", "must not be MODEL_DIR"),
                         (tmp_path / "file" / "out", "not writable")]:
        (tmp_path / "file").write_text("a file, not a directory")
        with pytest.raises(ExportError, match=message):
            transform_dir(src, out)
        assert not out.exists() or out == src
    assert _digest(src) == before
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        transform_dir(src, tmp_path / "plain")
    with pytest.raises(ExportError, match="must not contain MODEL_DIR"):
        transform_dir(src, src.parent, force=True)
    assert _digest(src) == before
    with pytest.raises(ExportError, match="bad shard size"):
        transform_dir(src, tmp_path / "o", max_shard_size="lots")


def test_load_errors(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mixtral"]
    with pytest.raises(LoadError, match="no 'revffn' section"):
        load(src)
    out = tmp_path / "out"
    transform_dir(src, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / ADAPTER_FILE).rename(tmp_path / "adapters")
    with pytest.raises(LoadError, match="missing"):
        load(out)
    (tmp_path / "adapters").rename(out / ADAPTER_FILE)
    for broken, message in [({"format_version": 1}, "broken"),
                            ({**cfg["revffn"], "format_version": 99}, "format_version"),
                            ("yes", "not an object")]:
        (out / "config.json").write_text(json.dumps({**cfg, "revffn": broken}))
        with pytest.raises(LoadError, match=message) as info:
            load(out)
        assert isinstance(info.value, RevFFNError) and "\n" not in str(info.value)


def test_transform_options_replayed(sources: dict[str, Path], tmp_path: Path) -> None:
    rev = rf.transform(rf.load_model(sources["olmoe"]), layers=[1], checkpoint_rest=True,
                       loss_head="original")
    rev.save_pretrained(tmp_path / "out")
    back = load(tmp_path / "out")
    assert (back.converted, back.checkpoint_rest, back.loss_head) == ([1], True, "original")
    ids = _ids()
    assert torch.equal(_logits(back, ids), _logits(rev, ids))

    def my_pass(gm: torch.fx.GraphModule) -> None:
        return None

    custom = rf.transform(rf.load_model(sources["olmoe"]), passes=[my_pass])
    custom.save_pretrained(tmp_path / "custom")
    with pytest.raises(LoadError, match="custom pass"):
        load(tmp_path / "custom")
    assert load(tmp_path / "custom", passes=[my_pass]).user_passes == [my_pass]
