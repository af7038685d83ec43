"""The compiler as lists of passes, each with torch.fx's signature ``(GraphModule) ->
PassResult`` and its parameters in the constructor.

Per converted layer (:func:`layer_pipeline`)::

    Couple -> [the user's passes] -> ChunkTokens -> (coupling checked after each)
        -> inverse (generate_inverse)

Per model graph (:func:`model_pipeline`)::

    Fuse -> CheckpointRest -> ChunkLossHead -> CutAtHead   (the last three when asked)

A list is run by :class:`~revffn_fx.passes.manager.PassManager`; a user's pass
(``rf.transform(..., passes=[...])``) runs on each layer graph after Couple, or with
``scope = "model"`` on the model graph after the built-in its ``after`` names.
:func:`coupling_problem` is the invariant the layer pipeline keeps after
the coupling exists: one split of the hidden state, a chain of stream updates, one merge
of the final streams; the PassManager names the pass that broke it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..errors import InternalError, RevFFNError
from ..runtime.chunking import ChunkedForwards
from ..runtime.stack import Checkpointed
from ..runtime.streams import MERGES, SPLITS
from .chunk_tokens import chunk_tokens, tokenwise_targets
from .couple import couple_layer
from .fuse import fuse_stacks
from .loss_head import chunk_loss_head
from .manager import Pass


def coupling_problem(gm: fx.GraphModule) -> str | None:
    """What is wrong with ``gm`` as a coupling graph, or None when it is intact: one split
    of the hidden state into streams, stream updates ``x_t <- x_t + branch`` (or a scaled
    ``x_t * c + branch``), and one merge of the final streams."""
    nodes = list(gm.graph.nodes)
    splits = [n for n in nodes if n.op == "call_function" and n.target in SPLITS.values()]
    merges = [n for n in nodes if n.op == "call_function" and n.target in MERGES.values()]
    if len(splits) != 1:
        return f"{len(splits)} splits of the hidden state (a coupling has one)"
    if len(merges) != 1:
        return f"{len(merges)} merges of the streams (a coupling has one)"
    streams = sorted(splits[0].users, key=lambda u: u.args[1] if len(u.args) > 1 else -1)
    if not streams or any(u.target is not operator.getitem for u in streams):
        return "the split's streams are not read one by one"
    current, updates = list(streams), 0
    for node in nodes:
        if node.op != "call_function" or node.target is not operator.add:
            continue
        for operand in node.args[:2]:
            kept = operand.args[0] if (isinstance(operand, fx.Node)
                                       and operand.meta.get("revffn") == "coupling_scale"
                                       ) else operand
            if kept in current:
                current[current.index(kept)] = node
                updates += 1
                break
    if not updates:
        return "no stream update between the split and the merge"
    if list(merges[0].args) != current:
        return "the merge does not read the final streams"
    return None


class _Builtin(PassBase):
    """A built-in pass: ``name`` for records and diffs, and a crash in it is a bug."""

    name = "pass"

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover
        raise NotImplementedError


class Couple(_Builtin):
    """Rewrite one layer graph into its reversible coupling graph (:func:`couple_layer`)."""

    def __init__(self, plan: Any, coupling: str, adapters: nn.ModuleDict | None = None,
                 cross: dict[str, nn.Module] | None = None, momentum: float | None = None,
                 start: int = 0) -> None:
        self.plan, self.coupling, self.adapters = plan, coupling, adapters
        self.cross, self.momentum, self.start = cross, momentum, start
        self.name = f"couple_{coupling}"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = couple_layer(graph_module, self.plan, self.coupling, self.adapters, self.cross,
                          self.momentum, self.start)
        return PassResult(gm, True)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        why = coupling_problem(graph_module)
        if why is not None:
            raise InternalError(f"built-in pass {self.name} made no valid coupling: {why}")


class ChunkTokens(_Builtin):
    """Call the token-wise modules (MoE, MLP) of a coupling graph through the token-chunked
    wrapper (:func:`~revffn_fx.passes.chunk_tokens.chunk_tokens`)."""

    name = "chunk_tokens"

    def __init__(self, plan: Any, options: Any) -> None:
        self.targets, self.options = tokenwise_targets(plan), options

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        return PassResult(graph_module,
                          bool(chunk_tokens(graph_module, self.targets, self.options)))


class Fuse(_Builtin):
    """Replace runs of converted layer calls by reversible-stack nodes (:func:`fuse_stacks`)."""

    name = "fuse"

    def __init__(self, layers: dict[str, Any], bind: Callable[[fx.Node], Any], split: str,
                 options: Any) -> None:
        self.layers, self.bind, self.split, self.options = layers, bind, split, options

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm, stacks = fuse_stacks(graph_module, self.layers, self.bind, self.split,
                                 self.options)
        return PassResult(gm, bool(stacks))


class CheckpointRest(_Builtin):
    """Run the decoder layers left out of the stacks under activation checkpointing."""

    name = "checkpoint_rest"

    def __init__(self, layers: dict[str, nn.Module],
                 chunked: dict[str, ChunkedForwards] | None = None) -> None:
        self.layers = layers  # call_module target -> the decoder layer
        self.chunked = chunked or {}  # target -> its token-wise submodules, chunked

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        modified = False
        for node in graph_module.graph.nodes:
            if node.op == "call_module" and node.target in self.layers:
                name = "revffn_ckpt_" + node.target.replace(".", "_")
                graph_module.add_submodule(name, Checkpointed(self.layers[node.target],
                                                              self.chunked.get(node.target)))
                node.target = name
                node.meta["revffn"] = "checkpoint"
                node.meta["from_node"] = node.name
                modified = True
        return PassResult(graph_module, modified)


class ChunkLossHead(_Builtin):
    """Replace lm_head + logit transform + cross-entropy by the chunked loss head;
    ``status`` is "chunked" or why the head was left as it is."""

    name = "chunk_head"

    def __init__(self, head_target: str, options: Any) -> None:
        self.head_target, self.options = head_target, options
        self.status = "not run"

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm, why = chunk_loss_head(graph_module, self.head_target, self.options)
        self.status = why or "chunked"
        return PassResult(gm, not why)


class CutAtHead(_Builtin):
    """Cut the graph before the output embeddings: it returns ``(final hidden, None)``."""

    name = "cut_at_head"

    def __init__(self, head_target: str) -> None:
        self.head_target = head_target

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        head = next((n for n in graph.nodes
                     if n.op == "call_module" and n.target == self.head_target), None)
        if head is None:
            raise RevFFNError(f"no call of the output embeddings {self.head_target} in the "
                              "model graph: cannot return the final hidden states")
        out = next(n for n in graph.nodes if n.op == "output")
        out.args = ((head.args[0], None),)
        graph.eliminate_dead_code()
        return PassResult(graph_module, True)


def scope_of(p: Pass) -> str:
    """Where a user's pass runs: ``p.scope`` "layer" (default: on each coupling graph,
    after Couple) or "model" (on the model graph, after the built-in named by ``p.after``,
    default "fuse")."""
    scope = getattr(p, "scope", "layer")
    if scope not in ("layer", "model"):
        raise RevFFNError(f"pass {getattr(p, '__name__', type(p).__name__)}: scope must be "
                          f"'layer' or 'model', not {scope!r}")
    return scope


def layer_pipeline(couple: Couple, user_passes: Sequence[Pass] = (),
                   chunk: ChunkTokens | None = None) -> list[Pass]:
    """The passes run on one layer graph, in order (the inverse is generated after); the
    token chunking last, so a user's pass sees the modules as the model has them."""
    return [couple, *(p for p in user_passes if scope_of(p) == "layer"),
            *([chunk] if chunk is not None else [])]


def model_pipeline(fuse: Fuse, checkpoint_rest: CheckpointRest | None = None,
                   chunk_head: ChunkLossHead | None = None,
                   cut_at_head: CutAtHead | None = None,
                   user_passes: Sequence[Pass] = ()) -> list[Pass]:
    """The passes run on the model graph, in order; None leaves a pass out. A user's
    model-scope pass goes right after the built-in its ``after`` names (default "fuse");
    naming one that does not run here places it last."""
    out: list[Pass] = []
    mine = [p for p in user_passes if scope_of(p) == "model"]
    for builtin in (fuse, checkpoint_rest, chunk_head, cut_at_head):
        if builtin is None:
            continue
        out.append(builtin)
        out += [p for p in mine if getattr(p, "after", "fuse") == builtin.name]
    return out + [p for p in mine if p not in out]
