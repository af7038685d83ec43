"""The built-in passes as torch.fx passes, and the coupling invariant checked after each.

A pass that breaks a layer's coupling (split, stream updates, merge) is named at once,
instead of a generic error later in the inverse pass.
"""

from __future__ import annotations

import operator

import pytest
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from zoo import tiny_model

import revffn_fx as rf
from revffn_fx.errors import InternalError, RevFFNError
from revffn_fx.passes.manager import PassManager, is_builtin, snapshot
from revffn_fx.passes.pipeline import Couple, coupling_problem, layer_pipeline


@pytest.fixture(scope="module")
def rev() -> rf.RevModel:
    return rf.transform(tiny_model("mixtral", num_hidden_layers=2))


def _coupling(rev: rf.RevModel, i: int = 0) -> fx.GraphModule:
    return snapshot(rev.specs(True)[i].forward)


def _drop_last_update(gm: fx.GraphModule) -> fx.GraphModule:
    """A 'rewrite' that silently drops the last stream update before the merge."""
    merge = next(n for n in gm.graph.nodes if n.op == "call_function"
                 and n.target.__name__.startswith("merge"))
    add = next(a for a in merge.args if isinstance(a, fx.Node) and a.target is operator.add)
    stream = next(x for x in add.args[:2] if isinstance(x, fx.Node)
                  and (x.target is operator.getitem or x.target is operator.add))
    merge.replace_input_with(add, stream)
    gm.graph.eliminate_dead_code()
    return gm


def test_every_coupling_keeps_the_invariant(rev: rf.RevModel) -> None:
    for i in rev.converted:
        assert coupling_problem(_coupling(rev, i)) is None
    layer = rev.traced.layers[0].trace(True)
    assert coupling_problem(layer) is not None  # the original layer is no coupling


def test_the_pass_that_breaks_the_coupling_is_named(rev: rf.RevModel) -> None:
    pm = PassManager([lambda gm: gm, _drop_last_update], invariant=coupling_problem)
    with pytest.raises(RevFFNError, match="pass _drop_last_update broke the coupling: the "
                                          "merge does not read the final streams"):
        pm(_coupling(rev))
    # without the check the broken graph goes through (the inverse would fail later)
    PassManager([_drop_last_update])(_coupling(rev))

    class Ours(PassBase):  # a built-in doing the same: a bug
        name = "ours"

        def call(self, gm: fx.GraphModule) -> PassResult:
            return PassResult(_drop_last_update(gm), True)

    Ours.__module__ = "revffn_fx.passes.pipeline"
    with pytest.raises(InternalError, match="built-in pass ours broke the coupling"):
        PassManager([Ours()], invariant=coupling_problem)(_coupling(rev))


def test_couple_is_a_torch_fx_pass(rev: rf.RevModel) -> None:
    i = rev.converted[0]
    plan = rev.plan.layers[i]
    couple = Couple(plan, "revffn", rev.adapters[str(i)], start=rev.update_targets[i][0])
    assert isinstance(couple, PassBase) and is_builtin(couple)
    pm = PassManager(layer_pipeline(couple), invariant=coupling_problem)
    gm = pm(snapshot(rev.traced.layers[i].trace(True))).graph_module
    assert coupling_problem(gm) is None
    assert [r.name for r in pm.records] == ["couple_revffn"]
    want = _coupling(rev, i)
    assert [n.op for n in gm.graph.nodes] == [n.op for n in want.graph.nodes]


def test_the_compiled_artefact_is_apart_from_the_module(rev: rf.RevModel) -> None:
    """RevModel holds a CompiledModel (specs, graphs, records): not a submodule, no
    parameters of its own; turning checkpointing on drops only the model graphs."""
    from torch import nn

    from revffn_fx.compiled import CompiledModel

    assert isinstance(rev.compiled, CompiledModel) and not isinstance(rev.compiled, nn.Module)
    assert not any(n.startswith("compiled") for n, _ in rev.named_modules())
    assert set(rev.state_dict()) == ({f"model.{k}" for k in rev.model.state_dict()}
                                     | {f"adapters.{k}" for k in rev.adapters.state_dict()})
    rev.graph(True)
    specs = rev.specs(True)
    assert rev._graphs and rev.pass_records["model"]
    rev.activation_checkpointing_enable()
    assert not rev._graphs and rev.specs(True) is specs and rev.checkpoint_rest
    rev.graph(True)
    assert [r.name for r in rev.pass_records["model"]] == ["fuse", "checkpoint_rest"]
    rev.activation_checkpointing_disable()
    assert not rev._graphs and not rev.checkpoint_rest


def test_the_runtime_knows_no_torch_fx() -> None:
    """The runtime runs branches as plain modules: no module of it imports torch.fx (the
    graph side wraps and inserts its helpers)."""
    import ast
    from pathlib import Path

    runtime = Path(rf.__file__).parent / "runtime"
    for file in sorted(runtime.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch.fx" or n.startswith("torch.fx.") for n in names), file


def test_a_user_pass_between_two_builtin_model_passes(tmp_path) -> None:
    """scope="model", after="fuse": runs between Fuse and CheckpointRest, sees the stacks,
    and is recorded as a model pass (rf.load asks for it again)."""
    seen: list[int] = []

    def count_stacks(gm: fx.GraphModule) -> PassResult:
        seen.append(sum(n.op == "call_module" and n.target.startswith("revffn_stack")
                        for n in gm.graph.nodes))
        return PassResult(gm, False)

    count_stacks.scope, count_stacks.after = "model", "fuse"  # type: ignore[attr-defined]
    rev = rf.transform(tiny_model("mixtral", num_hidden_layers=3), layers=[0, 2],
                       checkpoint_rest=True, passes=[count_stacks])
    rev.graph(True)
    assert [r.name for r in rev.pass_records["model"]] == ["fuse", "count_stacks",
                                                           "checkpoint_rest"]
    assert seen == [2]  # layers 0 and 2: two stacks, layer 1 between them
    assert [r.name for r in rev.pass_records["layer0"]] == ["couple_revffn", "chunk_tokens"]
    rev.save_pretrained(tmp_path)
    with pytest.raises(rf.LoadError, match="count_stacks"):
        rf.load(tmp_path)
    assert rf.load(tmp_path, passes=[count_stacks]).user_passes == [count_stacks]
    count_stacks.scope = "graph"  # type: ignore[attr-defined]
    with pytest.raises(RevFFNError, match="scope must be 'layer' or 'model'"):
        rf.transform(tiny_model("mixtral", num_hidden_layers=3), passes=[count_stacks])
