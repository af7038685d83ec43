"""The domain-shift corpus (examples/make_domain_corpus.py): deterministic, not Python, and
at full size >= 1M training / >= 50k held-out tokens of the shipped model's tokenizer
(measured on a slice, scaled by the document count)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLICE = 800  # documents tokenized to estimate tokens per document


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("make_domain_corpus",
                                                  ROOT / "examples" / "make_domain_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_domain_corpus"] = module
    spec.loader.exec_module(module)
    return module


def test_deterministic(gen):
    assert gen.make_world() == gen.make_world()
    assert gen.documents("train", 200) == gen.documents("train", 200)
    assert gen.documents("held_out", 50) == gen.documents("held_out", 50)
    # a longer draw starts with the shorter one: the slice below is the full corpus' start
    assert gen.documents("train", 300)[:200] == gen.documents("train", 200)


def test_splits_differ_and_share_no_document(gen):
    train = gen.documents("train")
    held = gen.documents("held_out")
    assert len(train) == gen.TRAIN_DOCS and len(held) == gen.HELD_OUT_DOCS
    assert not set(held) & set(train)


def test_not_python(gen):
    docs = gen.documents("train", 300) + gen.documents("held_out", 100)
    with pytest.raises(SyntaxError):
        ast.parse(gen.DOC_SEPARATOR.join(docs))
    parses = 0
    for d in docs:
        try:
            ast.parse(d)
            parses += 1
        except SyntaxError:
            pass
    assert parses == 0  # not one document is a Python program
    code = ("def ", "import ", "class ", "return ", "self.", "    ")
    assert not any(line.startswith(code) for d in docs for line in d.splitlines())


def test_enough_tokens(gen):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ROOT / "examples" / "tiny-moe-stdlib" / "tokenizer.json"))
    # tokens per document (+1: the end-of-text the benchmark appends to each)
    per_doc = sum(len(e.ids) + 1 for e in tok.encode_batch(
        gen.documents("train", SLICE), add_special_tokens=False)) / SLICE
    held_per_doc = sum(len(e.ids) + 1 for e in tok.encode_batch(
        gen.documents("held_out", SLICE // 4), add_special_tokens=False)) / (SLICE // 4)
    assert 80 < per_doc < 140 and 80 < held_per_doc < 140
    # 5% margin on the estimate (the full corpus measured 1,114,090 and 68,907 tokens)
    assert per_doc * gen.TRAIN_DOCS >= 1.05 * 1_000_000
    assert held_per_doc * gen.HELD_OUT_DOCS >= 1.05 * 50_000


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_domain",
                                                  ROOT / "benchmarks" / "quality_domain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_schedule_warms_up_then_decays_to_zero_at_the_run_length(bench):
    from argparse import Namespace

    lin, const = Namespace(lr=1.0, schedule="linear"), Namespace(lr=1.0, schedule="constant")
    w = bench.WARMUP
    assert bench.lr_at(0, 300, lin) == pytest.approx(1 / w)
    assert bench.lr_at(w - 1, 300, lin) == pytest.approx(1.0)
    assert bench.lr_at(w, 300, lin) == pytest.approx(1.0)
    assert bench.lr_at(299, 300, lin) == pytest.approx(1 / (300 - w))
    assert bench.lr_at(150, 300, lin) > bench.lr_at(151, 300, lin) > 0
    assert bench.lr_at(299, 300, const) == bench.lr_at(w, 1200, const) == 1.0


def test_summary_takes_a_decaying_run_only_at_its_length(bench, tmp_path):
    """A 1200-step linear run passes step 300 with its lr still high: that figure is not the
    300-step result, the 300-step linear run's is; both merge into one row per seed."""
    import json

    def write(name, seed, horizon, evals):
        rec = {"name": name, "seed": seed, "evals": {str(k): {"domain_loss": v,
                                                               "stdlib_loss": 5.0}
                                                     for k, v in evals.items()},
               "schedule": "linear", "horizon": horizon}
        # the longer run's file read last, so its step-300 figure would win a plain merge
        (tmp_path / f"{name}-s{seed}-{'z' if horizon > 300 else 'a'}{horizon}.json"
         ).write_text(json.dumps(rec))

    for seed in (0, 1):
        write("full", seed, 300, {0: 6.0, 300: 0.60})
        write("full", seed, 1200, {0: 6.0, 300: 0.90, 1200: 0.40})
        write("momentum", seed, 300, {300: 0.603})
    table = bench.summarize(tmp_path)
    full = table["full"]["by_length"]
    assert full["300"]["domain"]["mean"] == pytest.approx(0.60)  # not the 1200 run's 0.90
    assert full["1200"]["domain"]["mean"] == pytest.approx(0.40)
    assert table["momentum"]["by_length"]["300"]["vs_full_pct"] == pytest.approx(0.5)
