"""Tracing: every supported architecture (and a hand-written model) traces into a model graph
with one node per decoder layer and per-layer graphs with attention/MoE/norm leaves, and the
traced graphs compute exactly what the model computes (logits, loss, gradients)."""

from __future__ import annotations

import re
from typing import Any

import networkx as nx
import pytest
import torch
from torch import nn
from zoo import ARCHS, RANDOM, HandBlock, HandMoE, save_and_load, tiny_model

from revffn_fx.errors import TraceError
from revffn_fx.frontend.decoder_layers import is_norm
from revffn_fx.frontend.ir import TracedModel, trace

MODELS = [*ARCHS, "hand"]


_cache: dict[str, tuple[nn.Module, TracedModel]] = {}


@pytest.fixture(scope="module", params=MODELS)
def traced(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, TracedModel]:
    name = request.param
    if name not in _cache:
        model = tiny_model(name, **RANDOM.get(name, {}))
        if name != "hand":
            model = save_and_load(model, tmp_path_factory.mktemp(name))
        _cache[name] = (model, trace(model))
    return _cache[name]


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 8), generator=gen)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # right-padded second row
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _run(fn: Any, with_mask: bool, seed: int = 1234) -> Any:
    batch = _batch()
    if not with_mask:
        batch.pop("attention_mask")
    torch.manual_seed(seed)
    return fn(**batch)


def _original(model: nn.Module) -> Any:
    return lambda **kw: model(**kw, use_cache=False)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "nomask"])
def test_forward_matches(traced: tuple[nn.Module, TracedModel], training: bool,
                         with_mask: bool) -> None:
    model, rf = traced
    model.train(training)
    with torch.no_grad():
        ref = _run(_original(model), with_mask)
        out = _run(rf, with_mask)  # the model graph, layers as modules
        with rf.layer_graphs():  # and with every layer run through its own graph
            out_layers = _run(rf, with_mask)
    for got in (out, out_layers):
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.loss, ref.loss, atol=1e-6, rtol=0)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradients_match(traced: tuple[nn.Module, TracedModel], training: bool) -> None:
    model, rf = traced
    model.train(training)
    params = dict(model.named_parameters())

    def grads(fn: Any) -> dict[str, torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        _run(fn, with_mask=True).loss.backward()
        return {k: None if p.grad is None else p.grad.clone() for k, p in params.items()}

    ref = grads(_original(model))
    with rf.layer_graphs():
        got = grads(rf)
    model.zero_grad(set_to_none=True)
    assert sum(g is not None for g in ref.values()) > len(ref) // 2
    for k in params:
        if ref[k] is None:
            assert got[k] is None, k
        else:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0, msg=k)


_FFN = re.compile(r"moe|mlp|ffn|sparse", re.IGNORECASE)
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)


def test_structure(traced: tuple[nn.Module, TracedModel]) -> None:
    model, rf = traced
    model.eval()
    gm = rf.graph_module
    layer_targets = {"model." + q for q in rf.layer_names}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert sorted(t for t in called if t in layer_targets) == sorted(layer_targets)
    # nothing inside a layer shows up in the model graph
    assert not any(t.startswith(tuple(q + "." for q in layer_targets)) for t in called)
    assert len(rf.layers) == len(rf.layer_names) >= 2
    for layer in rf.layers:
        lgm = layer.graph_module
        mods = dict(lgm.named_modules())
        leaves = [mods[n.target] for n in lgm.graph.nodes if n.op == "call_module"]
        names = [type(m).__name__ for m in leaves]
        assert any(is_norm(m) for m in leaves), names
        assert any(_ATTN.search(n) for n in names), names
        assert any(_FFN.search(n) for n in names), names
        # attention and MoE are whole: none of their projections is a node of its own
        assert not any(isinstance(m, nn.Linear) for m in leaves), names
        placeholders = [n.target for n in lgm.graph.nodes if n.op == "placeholder"]
        assert placeholders == layer.placeholder_names


def test_nx(traced: tuple[nn.Module, TracedModel]) -> None:
    _, rf = traced
    for gm, g in [(rf.graph_module, rf.nx()), *((L.graph_module, L.nx()) for L in rf.layers)]:
        assert isinstance(g, nx.DiGraph)
        assert g.number_of_nodes() == len(gm.graph.nodes)
        assert nx.is_directed_acyclic_graph(g)
        for _, data in g.nodes(data=True):
            assert {"op", "target", "module_type"} <= set(data)
            assert (data["module_type"] is not None) == (data["op"] == "call_module")
    layer = rf.layers[0]
    mods = dict(layer.graph_module.named_modules())
    expected = {n.name: type(mods[n.target]).__name__ for n in layer.graph_module.graph.nodes
                if n.op == "call_module"}
    g = layer.nx()
    assert {k: d["module_type"] for k, d in g.nodes(data=True) if d["op"] == "call_module"} \
        == expected


# ------------------------------------------------------------------------------------------
# Errors for code torch.fx cannot follow.


class CheckedEmbedding(nn.Module):
    """Data-dependent Python control flow at model level, outside any leaf."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.table = nn.Embedding(vocab, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if (ids >= self.vocab).any():
            raise IndexError("token id out of range")
        return self.table(ids)


class GuardedNormAttention(nn.Module):
    """A norm + attention container (traced through, like dbrx's norm_attn_norm) whose
    forward branches on a tensor value."""

    def __init__(self, block: HandBlock) -> None:
        super().__init__()
        self.norm = block.attn_norm
        self.attn = block.attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if h.isnan().any():
            raise FloatingPointError("nan")
        return self.attn(h, mask)


class GuardedBlock(HandBlock):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.norm_attn = GuardedNormAttention(self)
        del self.attn_norm, self.attn

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.norm_attn(x, mask)
        return x + self.moe(self.moe_norm(x))


class SelfCheckingBlock(HandBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = super().forward(x, mask)
        if x.abs().max() > 1e4:  # in the layer's own code: no submodule to keep whole
            x = x / 2
        return x


def _hand_with(embed: bool = False, block: type[HandBlock] | None = None) -> HandMoE:
    torch.manual_seed(0)
    model = HandMoE()
    if embed:
        model.embed = CheckedEmbedding(128, 64)
    if block is not None:
        model.blocks = nn.ModuleList(block(64, 4, 96, 4, 2) for _ in range(2))
    return model


def _assert_same(model: nn.Module, rf: TracedModel) -> None:
    with torch.no_grad(), rf.layer_graphs():
        ref, out = _run(_original(model), True), _run(rf, True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)


def test_untraceable_submodule_becomes_a_leaf_by_itself() -> None:
    # a model-level module whose forward branches on a tensor value is kept whole, with no
    # leaf_modules given; a user's leaf_modules still works (and needs no retry)
    model = _hand_with(embed=True)
    rf = trace(model)
    assert rf.auto_leaves == {"embed"} and not rf.layers_only
    _assert_same(model, rf)
    for leaf in ("CheckedEmbedding", "embed"):
        by_hand = trace(model, leaf_modules=[leaf])
        assert by_hand.auto_leaves == set()
        _assert_same(model, by_hand)


def test_untraceable_layer_submodule_becomes_a_leaf_by_itself() -> None:
    model = _hand_with(block=GuardedBlock)
    rf = trace(model)
    assert rf.layers[0].auto_leaves == {"blocks.0.norm_attn"}
    assert rf.layers[1].auto_leaves == {"blocks.1.norm_attn"}
    _assert_same(model, rf)
    targets = [n.target for n in rf.layers[1].graph_module.graph.nodes if n.op == "call_module"]
    assert "norm_attn" in targets
    rf = trace(model, leaf_modules=["GuardedNormAttention"])
    assert rf.layers[0].auto_leaves == set()
    _assert_same(model, rf)


def test_trace_error_in_layer_own_forward() -> None:
    model = _hand_with(block=SelfCheckingBlock)
    with pytest.raises(TraceError) as err:
        trace(model)
    msg = str(err.value)
    assert "blocks.0 (SelfCheckingBlock)" in msg and "itself" in msg
    assert "leaf_modules" in msg
    assert re.search(r"test_trace\.py:\d+", msg), msg  # the file and line of the branch
    # the layer cannot be kept whole: it is what is being traced
    with pytest.raises(TraceError):
        trace(model, leaf_modules=["SelfCheckingBlock"])


def test_untraceable_stack_owner_traces_the_layers_alone() -> None:
    # GPT-2's model forward branches on traced values: its layers are traced on their own
    # and the model's forward runs as written
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=128, n_embd=32, n_layer=2,
                                                        n_head=2, n_positions=32))
    rf = trace(model)
    assert rf.layers_only and "holds the decoder layers" in rf.model_error
    assert "leaf_modules" not in rf.model_error
    with pytest.raises(TraceError, match="traced on their own"):
        rf.graph_module  # noqa: B018
    _assert_same(model, rf)
