"""calibrate: fit the revffn adapters to the pretrained layers on sample text.

A revffn coupling runs each pretrained branch on a half-width stream through linear
adapters (``up``: d/2 -> d before the branch, ``down``: d -> d/2 after it). The fixed
initialisation (``make_adapters``) only routes features; the coupled model then computes a
different function from the pretrained one and fine-tuning must re-learn it. Calibration
(as in post-training quantization: run sample data, fit, keep the graph) chooses the
adapters by least squares so that every coupled layer reproduces its pretrained layer as
closely as a half-width block can, layer after layer:

- ``up`` of a branch: from the stream it reads to the value the pretrained branch read
  (its residual input: the layer input for the first branch, the state after the first
  residual add for the second);
- ``down`` of a branch: from the branch output to what the pretrained layer added to the
  stream this branch updates (its half of the post-add state minus the stream).

Each fit sees the coupled model's own streams (the layers before it already calibrated),
and the pretrained values come from running the original layer graphs on the same text,
so errors do not compound unnoticed. Only adapter weights change; run it before
fine-tuning (or before ``save_pretrained``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .errors import LoadError, RevFFNError
from .frontend.capture import forward_params
from .frontend.loading import quiet
from .frontend.registry import facts_for
from .model import RevModel
from .passes.analyze import analyze_layer, router_ids
from .passes.couple import UPDATE_NAMES
from .runtime.streams import MERGES, SPLITS

BRANCHES = UPDATE_NAMES  # adapter prefixes of the updates of a coupling (F, G, H, ...)


@dataclass
class LayerFit:
    """Relative error of one coupled layer's output against its pretrained layer."""

    index: int
    rel_err_before: float
    rel_err_after: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate` did: tokens used and the per-layer fit."""

    tokens: int
    ridge: float
    layers: list[LayerFit] = field(default_factory=list)

    def summary(self) -> str:
        if not self.layers:
            return f"calibrated on {self.tokens} tokens: no layers"
        before = max(f.rel_err_before for f in self.layers)
        after = max(f.rel_err_after for f in self.layers)
        return (f"calibrated {len(self.layers)} layers on {self.tokens} tokens: worst layer "
                f"output error vs the pretrained layer {before:.3f} -> {after:.3f}")


class _Normal:
    """Accumulated normal equations of ``Y ~ X W^T`` over weighted token rows (fp64)."""

    def __init__(self) -> None:
        self.xtx: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        y = y.reshape(-1, y.shape[-1]).double()
        xw = x * w.reshape(-1, 1)
        xtx, xty = xw.T @ x, xw.T @ y
        if self.xtx is None:
            self.xtx, self.xty = xtx, xty
        else:
            self.xtx += xtx
            self.xty += xty

    def solve(self, ridge: float) -> torch.Tensor:
        assert self.xtx is not None and self.xty is not None
        a = self.xtx.clone()
        # ridge relative to the mean feature energy: scale-free, and keeps the solve
        # well-posed when features are (nearly) collinear
        a.diagonal().add_(ridge * a.diagonal().mean().clamp_min(1e-30))
        return torch.linalg.solve(a, self.xty).T


class _Values(fx.Interpreter):
    """Runs a layer graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names = names
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _batches(data: Iterable[Any]) -> list[dict[str, torch.Tensor]]:
    out = []
    for item in data:
        if isinstance(item, torch.Tensor):
            item = {"input_ids": item}
        if not isinstance(item, Mapping) or "input_ids" not in item:
            raise RevFFNError("calibration data: each batch must be a tensor of token ids or "
                              "a mapping with 'input_ids' (and optionally 'attention_mask')")
        ids = item["input_ids"]
        if ids.dim() == 1:
            ids = ids[None]
        mask = item.get("attention_mask")
        out.append({"input_ids": ids, **({"attention_mask": mask} if mask is not None else {})})
    if not out:
        raise RevFFNError("calibration data is empty")
    return out


@torch.no_grad()
def calibrate(rev: RevModel, data: Iterable[Any], ridge: float = 1e-3,
              correct_drift: bool = True,
              progress: Callable[[str], None] | None = None) -> CalibrationReport:
    """Fit every converted layer's adapters by least squares on ``data``.

    ``data``: batches of token ids (tensors ``(batch, seq)``) or mappings with
    ``input_ids`` and optionally ``attention_mask`` (padding is left out of the fit).
    A few thousand tokens of text like the fine-tuning data suffice: each adapter has
    d * d / 2 weights. ``ridge``: Tikhonov weight relative to the mean feature energy.
    ``correct_drift``: fit each ``down`` adapter to bring its stream back to the pretrained
    state (True), or only to what the pretrained branch added (False: smaller gains, a
    worse fit). Calibrated adapters have gains above 1; carry the streams in a wider dtype
    (``rf.transform(..., stream_dtype="float64")``) to keep the fp32 backward exact.
    Returns each layer's output error against the pretrained layer before and after.
    """
    if rev.coupling != "revffn":
        raise RevFFNError(f"calibration fits the revffn adapters; the {rev.coupling} "
                          "coupling has none")
    batches = _batches(data)
    model = rev.model
    traced = rev.traced
    device = next(model.parameters()).device
    overrides = facts_for(getattr(rev.config, "model_type", None)).kind_overrides
    routers = router_ids(model)
    specs = rev.specs(False)

    # 1. the pretrained model on the data: every decoder layer's call arguments
    calls = [_layer_calls(model, traced.layers, b, device) for b in batches]
    weights = [(b["attention_mask"] if "attention_mask" in b else torch.ones_like(
        b["input_ids"])).to(device=device, dtype=torch.float64) for b in batches]

    # 2. layer after layer: pretrained values, then the coupled layer's fit
    report = CalibrationReport(tokens=int(sum(float(w.sum()) for w in weights)), ridge=ridge)
    first = traced.layers[0].call.hidden_name
    rev_hidden: list[torch.Tensor] = [c[0][first] for c in calls]
    orig_hidden = list(rev_hidden)  # the pretrained model's state, carried layer to layer
    for lg in traced.layers:
        name = lg.call.hidden_name
        args = [{**c[lg.index], name: orig_hidden[k]} for k, c in enumerate(calls)]
        if lg.index not in specs:  # not converted: the original layer on both states
            for k, a in enumerate(args):
                rev_hidden[k] = _first(lg.module(**{**a, name: rev_hidden[k]}))
                orig_hidden[k] = _first(lg.module(**a))
            continue
        if progress:
            progress(f"calibrating layer {lg.index}")
        plan = analyze_layer(lg, overrides, False, routers)
        fit = _LayerFitting(specs[lg.index], rev.adapters[str(lg.index)], args, weights,
                            ridge, correct_drift)
        orig_hidden, rev_hidden, layer_fit = fit.run(lg, plan, rev_hidden)
        report.layers.append(layer_fit)
    return report


@dataclass
class _LayerFitting:
    """The least-squares fit of one converted layer's adapters, update after update."""

    spec: Any  # the layer's ReversibleSpec
    adapters: torch.nn.Module
    args: list[dict[str, Any]]  # per batch: the layer's call on the pretrained state
    weights: list[torch.Tensor]  # per batch: token weights (the attention mask)
    ridge: float
    correct_drift: bool

    def run(self, lg: Any, plan: Any, rev_hidden: list[torch.Tensor]
            ) -> tuple[list[torch.Tensor], list[torch.Tensor], LayerFit]:
        """Fit the layer; returns the pretrained layer's outputs, the coupled layer's (with
        the fitted adapters) and the output error before and after."""
        want = {n for s in plan.sublayers for n in (s.residual_node, s.add_node)}
        gm = lg.trace(False)
        originals, orig_hidden = [], []
        for a in self.args:
            interp = _Values(gm, want)
            orig_hidden.append(_first(interp.run(*(a.get(n) for n in lg.placeholder_names))))
            originals.append(interp.values)
        last = plan.sublayers[-1].add_node
        split = SPLITS[self.spec.split]
        streams = [list(split(h)) for h in rev_hidden]
        before = _layer_error(self.spec, streams, self.args, [o[last] for o in originals],
                              self.weights)
        for j, (update, sub) in enumerate(zip(self.spec.updates, plan.sublayers)):
            self._fit_update(j, update, sub, streams, originals)
        rev_hidden = [MERGES[self.spec.split](*s) for s in streams]
        after = _weighted_error(rev_hidden, [o[last] for o in originals], self.weights)
        return orig_hidden, rev_hidden, LayerFit(lg.index, before, after)

    def _fit_update(self, j: int, update: Any, sub: Any, streams: list[list[torch.Tensor]],
                    originals: list[dict[str, Any]]) -> None:
        """Fit one update's ``up`` and ``down`` adapters, then apply the update to
        ``streams``."""
        split = SPLITS[self.spec.split]
        up, down = self.adapters[f"{BRANCHES[j]}_up"], self.adapters[f"{BRANCHES[j]}_down"]
        # up: stream(s) the branch reads -> the pretrained branch input
        eq = _Normal()
        for k, a in enumerate(self.args):
            for x in _inputs_of(up, update, streams[k], a):
                eq.add(x, originals[k][sub.residual_node], self.weights[k])
        up.weight.copy_(eq.solve(self.ridge).to(up.weight.dtype))
        # down: branch output -> what the pretrained residual add gave this stream
        eq = _Normal()
        outs = []
        for k, a in enumerate(self.args):
            out = _inputs_of(down, update, streams[k], a)[0]
            post = split(originals[k][sub.add_node])[update.target]
            if self.correct_drift:  # also pull the stream back to the pretrained state
                target = post - streams[k][update.target]
            else:  # only what the pretrained branch added to this half
                target = post - split(originals[k][sub.residual_node])[update.target]
            eq.add(out, target, self.weights[k])
            outs.append(out)
        down.weight.copy_(eq.solve(self.ridge).to(down.weight.dtype))
        for k, s in enumerate(streams):
            s[update.target] = s[update.target] + down(outs[k])


def _layer_calls(model: torch.nn.Module, layers: list[Any], batch: dict[str, torch.Tensor],
                 device: torch.device) -> list[dict[str, Any]]:
    """Run the pretrained model (eval mode) on one batch; each decoder layer's arguments,
    bound to its forward's parameter names."""
    seen: dict[int, dict[str, Any]] = {}

    def hook_for(index: int, names: list[str]) -> Callable[..., None]:
        def hook(_m: Any, args: Any, kwargs: Any) -> None:
            bound = dict(zip(names, args))
            bound.update(kwargs)
            if index != layers[0].index:  # calibrate carries the hidden state itself:
                bound.pop(names[0], None)  # keeping every layer's would cost layers x data
            seen.setdefault(index, bound)
        return hook

    handles = [lg.module.register_forward_pre_hook(
        hook_for(lg.index, forward_params(lg.module)), with_kwargs=True) for lg in layers]
    was = model.training
    model.eval()
    try:
        mask = batch.get("attention_mask")
        model(input_ids=batch["input_ids"].to(device),
              **({"attention_mask": mask.to(device)} if mask is not None else {}))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    missing = [lg.index for lg in layers if lg.index not in seen]
    if missing:
        raise RevFFNError(f"calibration: decoder layer {missing[0]} was not called")
    return [seen[lg.index] for lg in layers]


def token_windows(tok: Any, texts: Iterable[str], max_tokens: int | None = None,
                  seq: int = 512, batch: int = 8) -> list[torch.Tensor]:
    """Texts tokenized (end-of-text after each), packed into ``(batch, seq)`` windows of
    token ids for :func:`calibrate`: at most ``max_tokens`` tokens, ``seq`` shortened to
    what there is; empty when fewer than 2 tokens."""
    ids: list[int] = []
    sep = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + sep
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    seq = min(seq, len(ids))
    if seq < 2:
        return []
    n = len(ids) // seq
    return list(torch.tensor(ids[:n * seq]).view(n, seq).split(batch))


def calibration_batches(model_dir: Path, path: str | os.PathLike[str], tokens: int,
                        seq: int = 512, batch: int = 8) -> list[torch.Tensor]:
    """The first ``tokens`` tokens of a text or JSONL file, as ``(batch, seq)`` windows.

    The file is streamed: JSONL rows are read until the budget is filled, and of a plain
    text file at most 32 characters per token of the budget (a token is rarely longer).
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise LoadError(f"calibration file {file} does not exist")
    if not file.is_file():
        raise LoadError(f"calibration file {file} is not a regular file")
    texts = _calibration_texts(file, tokens)
    try:
        with quiet():
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 -- any tokenizer failure is the same user error
        raise LoadError(f"--calibrate needs the tokenizer in {model_dir}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        windows = token_windows(tok, texts, tokens, seq, batch)
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"calibration file {file} cannot be read as text: {e}") from None
    if not windows:
        raise LoadError(f"calibration file {file} holds fewer than 2 tokens")
    return windows


def _calibration_texts(file: Path, tokens: int) -> Iterator[str]:
    """The texts of a calibration file, read lazily (``token_windows`` stops early).

    Every format is bounded by the token budget: at most 32 characters per token in all
    (a token is rarely longer), each text cut to what is left of that; a JSONL row is read
    up to 8 times that many characters (room for JSON escapes), a longer one is refused."""
    budget = max(32 * tokens, 1 << 16)
    with open(file, encoding="utf-8") as f:
        if file.suffix != ".jsonl":
            yield f.read(budget)
            return
        left = budget
        n = 0
        while left > 0:
            line = f.readline(8 * budget + 1)
            if not line:
                return
            n += 1
            if len(line) > 8 * budget and not line.endswith("\n"):
                raise LoadError(f"{file}:{n}: row longer than {8 * budget:,} characters, more "
                                f"than --calibration-tokens {tokens} can use; split it into "
                                "shorter rows")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as e:
                raise LoadError(f"{file}:{n}: not JSON ({getattr(e, 'msg', e)})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and "prompt" in row:
                text = str(row["prompt"]) + str(row.get("completion", ""))
            if not isinstance(text, str):
                raise LoadError(f"{file}:{n}: needs a 'text' or 'prompt' field")
            text = text[:left]
            left -= len(text)
            yield text


def _first(out: Any) -> torch.Tensor:
    """A layer's hidden-state output (layers may return tuples)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _inputs_of(module: torch.nn.Module, update: Any, streams: list[torch.Tensor],
               ctx: dict[str, Any]) -> list[torch.Tensor]:
    """Inputs of every call of ``module`` while ``update``'s branch runs on ``streams``."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        update.run(streams, ctx)
    finally:
        handle.remove()
    if not seen:
        raise RevFFNError(f"calibration: adapter {module} was not called by its branch")
    return seen


def _weighted_error(outs: list[torch.Tensor], refs: list[torch.Tensor],
                    weights: list[torch.Tensor]) -> float:
    """Relative error over all batches (padding weighted out)."""
    num = den = 0.0
    for out, ref, w in zip(outs, refs, weights):
        w = w.reshape(*w.shape, *([1] * (ref.dim() - w.dim())))
        num += float((((out.double() - ref.double()) ** 2) * w).sum())
        den += float(((ref.double() ** 2) * w).sum())
    return (num / max(den, 1e-30)) ** 0.5


def _layer_error(spec: Any, streams: list[list[torch.Tensor]], args: list[dict[str, Any]],
                 refs: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
    """The coupled layer's output error with its current adapters."""
    outs = []
    for s, a in zip(streams, args):
        s = list(s)
        for u in spec.updates:
            s[u.target] = s[u.target] + u.run(s, a)
        outs.append(MERGES[spec.split](*s))
    return _weighted_error(outs, refs, weights)
