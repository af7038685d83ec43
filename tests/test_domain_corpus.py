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
