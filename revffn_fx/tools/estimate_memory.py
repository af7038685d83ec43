"""Analytic estimate of activation memory from a config alone (no weights are read).

``estimate_saved_bytes(config, batch, seq, method)`` predicts what
:func:`revffn_fx.tools.measure_memory.saved_tensor_bytes` measures for one training forward (bytes
autograd keeps for backward, parameters excluded) under ``method``:

- ``checkpoint``: one layer boundary (the layer's input, ``T*d``) per decoder layer, plus
  the loss head, the token ids and the rotary tables;
- a coupling (``revffn``, ``revnet``, ``momentum``, ``meft``: :data:`STACKS`): one stack
  output (revffn: two half-width streams, ``T*d``; the others two full-width streams,
  ``2*T*d``, in the stream dtype) at any depth, plus, with exact streams, the bits each
  scaled update drops (one byte per element per update, every converted layer), plus the
  same constants;
- ``offload``: ``checkpoint`` with the layer boundaries (and whatever else autograd saves
  outside the recomputed layers) on the host: on the device one boundary in flight;
- ``none``: a per-layer activation model (norms, attention q/k/v/output, router, routed
  experts on ``T*top_k`` token rows, shared experts, dense MLPs) times the depth, plus
  the constants.

``T = batch * seq`` tokens, ``d`` the hidden size, ``e`` the bytes of the dtype. The loss
head of Hugging Face models (``original``) keeps the final norm's input and output
(``3*T*d*e``) and the fp32 log-softmax of the logits (``T*V*4``, the upcast applies in any
dtype): that is the 8 MiB constant of the reference config. RevModel's chunked head
(``chunked``, the default where :class:`revffn_fx.RevModel` has one) keeps, instead of the
logits, the gradients it computed in forward: ``T*d*e`` for the hidden states and ``V*d*e``
for the head weight.

Accuracy against the probe (tests/test_bench.py, docs/benchmarks.md): checkpoint / revffn /
revnet within 4% (exact tensor sizes; the error is small int tensors); ``none`` too within
1% on the Mixtral-like and Qwen2-MoE-like configs (batch 2 x 64 and 4 x 256 tokens) and
1.4% on the DeepSeek-V3-like one (2 layers, 2 x 64 tokens), whose MLA attention is modelled
coarsely: expect ``none`` to drift on attention variants not listed here (sliding window,
linear attention, eager attention's B*h*S*S probabilities). :func:`estimate` also gives the
activation part of a step's peak (:attr:`Estimate.peak_activation_bytes`), a coarser model:
within 3% at 4 x 256 tokens, up to 15% high at 2 x 64 where the activations are a small part.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from revffn_fx import couplings
from revffn_fx.options import TransformOptions


@dataclass(frozen=True)
class StackLayout:
    """What a coupling's reversible stack keeps, per the runtime (revffn_fx.runtime).

    ``streams``: the width of its streams together, in hidden sizes (revffn: two halves);
    ``scaled_updates``: updates per layer that keep a fraction g of the stream they
    overwrite (with exact streams each stores the bits the division by g drops);
    ``adapters``: parameters it adds per converted layer, in hidden**2; ``whole_layer``:
    one update per layer (bdia), so the backward recomputes attention and feed-forward
    together, not one branch at a time.
    """

    streams: int
    scaled_updates: int = 0
    adapters: int = 0
    whole_layer: bool = False


#: every coupling that converts layers, from the registry (revffn_fx.couplings): a coupling
#: added there is a row here without another edit (scaled updates per layer of two sublayers)
STACKS: dict[str, StackLayout] = {
    c.name: StackLayout(c.stream_width, c.scaled_updates(2), c.adapter_params,
                        bool(getattr(c, "whole_layer", False)))
    for c in couplings.REGISTRY.values() if c.converts}
METHODS = ("none", "checkpoint", "offload", *STACKS)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class Dims:
    """The sizes the estimate needs, read from a Hugging Face config."""

    hidden: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    top_k: int
    expert_inter: int
    shared_inter: int
    dense_inter: int
    dense_layers: frozenset[int]
    rope_dim: int
    mla: tuple[int, int, int, int, int] | None  # q_lora, kv_lora, nope, rope, v_head_dim

    @classmethod
    def of(cls, config: Any) -> Dims:
        d = int(_get(config, "hidden_size", "d_model", "n_embd"))
        heads = int(_get(config, "num_attention_heads", "n_heads", default=1))
        kv = int(_get(config, "num_key_value_heads", default=heads))
        hd = int(_get(config, "head_dim", default=d // heads))
        n = int(_get(config, "num_hidden_layers", "n_layers"))
        experts = int(_get(config, "num_local_experts", "num_experts", "n_routed_experts",
                           default=0))
        top_k = int(_get(config, "num_experts_per_tok", default=0))
        dense_inter = int(_get(config, "intermediate_size", default=4 * d))
        expert_inter = int(_get(config, "moe_intermediate_size", default=dense_inter))
        shared = int(_get(config, "shared_expert_intermediate_size", default=0))
        if not shared and _get(config, "n_shared_experts"):
            shared = int(config.n_shared_experts) * expert_inter
        dense: set[int] = set(range(int(_get(config, "first_k_dense_replace", default=0))))
        dense.update(int(i) for i in (_get(config, "mlp_only_layers", default=[]) or []))
        step = int(_get(config, "decoder_sparse_step", default=1) or 1)
        dense.update(i for i in range(n) if (i + 1) % step != 0)
        if not experts:
            dense = set(range(n))
        mla = None
        rope_dim = hd
        if _get(config, "kv_lora_rank") is not None:
            nope = int(_get(config, "qk_nope_head_dim", default=hd))
            rope_dim = int(_get(config, "qk_rope_head_dim", default=0))
            mla = (int(_get(config, "q_lora_rank", default=0) or 0), int(config.kv_lora_rank),
                   nope, rope_dim, int(_get(config, "v_head_dim", default=nope)))
        return cls(d, int(config.vocab_size), n, heads, kv, hd, experts, top_k, expert_inter,
                   shared, dense_inter, frozenset(dense), rope_dim, mla)


@dataclass
class Estimate:
    """Bytes by part; ``saved_bytes`` is their sum. ``peak_activation_bytes``: activation
    memory live at the step's peak, on top of parameters and all gradients (for ``none`` the
    peak comes at the start of backward, before any gradient exists)."""

    method: str
    parts: dict[str, int] = field(default_factory=dict)
    peak_activation_bytes: int = 0
    #: the largest single recomputation in backward (checkpoint, revffn, revnet), on top of
    #: what is saved; equals ``peak_activation_bytes`` unless layers are left out
    recompute_bytes: int = 0
    #: ``offload``: what autograd keeps on the host instead (not counted in ``parts``)
    host_bytes: int = 0

    @property
    def saved_bytes(self) -> int:
        return sum(self.parts.values())


def dtype_bytes(config: Any, dtype: torch.dtype | str | None) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or its name; None: the config's,
    float32 when it names none)."""
    if dtype is None:
        dtype = _get(config, "dtype", "torch_dtype", default=torch.float32)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""), torch.float32)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float32
    return torch.empty((), dtype=dtype).element_size()


def default_loss_head(method: str) -> str:
    """The transform's default head for a coupling (``TransformOptions().loss_head``:
    chunked); the original model's for ``none``, ``checkpoint`` and ``offload``."""
    if method in ("none", "checkpoint", "offload"):
        return "original"
    return TransformOptions().loss_head


def _attention(m: Dims, t: int, b: int, s: int, e: int) -> int:
    """Saved by one attention sublayer (norm excluded): q/k/v after rotary, output, lse."""
    if m.mla is None:
        return t * e * (2 * m.heads + 2 * m.kv_heads) * m.head_dim + b * m.heads * s * 4
    q_lora, kv_lora, nope, rope, v_dim = m.mla
    qk = nope + rope
    total = t * e * (3 * q_lora if q_lora else 0)        # q_a output: its norm's x, normed, out
    total += t * e * (kv_lora + rope + 2 * kv_lora)      # kv_a output, kv norm normed and out
    total += t * e * m.heads * (2 * qk + qk)             # q, k (rotary applied) and v padded
    total += t * e * m.heads * (v_dim + nope + rope)     # output, k_pe/q_pe pieces
    return total + b * m.heads * s * 4


def _ffn(m: Dims, t: int, e: int, dense: bool) -> int:
    """Saved by one feed-forward sublayer (norm excluded)."""
    if dense:
        return 4 * t * m.dense_inter * e                 # gate, up, act(gate), act*up
    rows = t * m.top_k                                   # routed token rows
    total = t * m.experts * 4 + t * m.top_k * 12         # router probs (fp32), top-k ids, weights
    total += rows * e * (4 * m.expert_inter + 2 * m.hidden) + rows * 8
    if m.shared_inter:
        total += t * e * (4 * m.shared_inter + m.hidden) + t * e  # shared expert + its gate
    return total


def _ffn_backward(m: Dims, t: int, e: int, dense: bool) -> int:
    """What the feed-forward's backward holds on top of what it saved, when a reversible
    stack recomputes it with gradients: the gradients of the gate and up projections'
    outputs and of the (gathered) input. Fitted to the MoE working set measured at long
    context (benchmarks/long_context.py floor: 49 x the hidden state at hidden 512, top-2,
    intermediate 1792, of which 32 are saved)."""
    if dense:
        return t * e * (2 * m.dense_inter + m.hidden)
    rows = t * m.top_k
    total = rows * e * (2 * m.expert_inter + m.hidden)
    if m.shared_inter:
        total += t * e * 2 * m.shared_inter
    return total


def _layer(m: Dims, i: int, b: int, s: int, e: int) -> int:
    """All a decoder layer saves under plain autograd."""
    t = b * s
    norms = 6 * t * m.hidden * e + 2 * t * 4             # 2 RMSNorms: x, normalized, out; rsqrt
    return norms + _attention(m, t, b, s, e) + _ffn(m, t, e, i in m.dense_layers)


def _runs(layers: Sequence[int]) -> int:
    """Number of contiguous runs in ``layers`` (one reversible stack each)."""
    ordered = sorted(set(layers))
    return sum(1 for j, i in enumerate(ordered) if j == 0 or ordered[j - 1] != i - 1)


def stream_layout(config: Any, coupling: str, dtype: torch.dtype | str | None = None,
                  stream_dtype: torch.dtype | str | None = None,
                  exact_streams: bool | None = None) -> tuple[int, int]:
    """(bytes per stream element, bits stored per element per scaled update) of
    ``coupling``'s stacks for weights in ``dtype``, as the transform's options decide
    (:class:`revffn_fx.options.TransformOptions`: ``exact_streams`` None is its default,
    on for the scaled couplings; an unset stream dtype is the runtime's rule, one step
    wider than the hidden state: fp32 -> fp64, 16-bit -> fp32; for exact streams, int32
    units for 16-bit models and float64 for fp32 (runtime/grid.py): 4 and 8 bytes too)."""
    e = dtype_bytes(config, dtype)
    name = {8: "float64", 4: "float32", 2: "bfloat16"}.get(e, "float32")
    if isinstance(stream_dtype, torch.dtype):
        stream_dtype = str(stream_dtype).replace("torch.", "")
    opts = TransformOptions(coupling=coupling, stream_dtype=stream_dtype,
                            exact_streams=exact_streams).resolved(name)
    sb = (dtype_bytes(config, opts.stream_dtype) if opts.stream_dtype is not None
          else 8 if e >= 4 else 4)  # runtime/stack.py RevStack.forward, runtime/grid.py
    # packed side bits (runtime/bits.py): log2(1/g) per element per scaled update
    bits = couplings.get(coupling).side_bits(opts.to_dict())
    return sb, bits if opts.exact_streams and STACKS[coupling].scaled_updates else 0


def estimate(config: Any, batch: int, seq: int, method: str,
             dtype: torch.dtype | str | None = None, loss_head: str | None = None,
             layers: Sequence[int] | None = None,
             stream_dtype: torch.dtype | str | None = None,
             exact_streams: bool | None = None, token_chunk: int | None = None) -> Estimate:
    """The saved-for-backward bytes of a training forward, by part; see the module doc.

    ``layers``: for a coupling, the decoder layers that are converted (None: all). The
    others run under plain autograd and save what a plain layer saves; each run of
    consecutive converted layers is one reversible stack that keeps its output.
    ``stream_dtype``, ``exact_streams``: the coupling's streams (:func:`stream_layout`).
    ``token_chunk``: the feed-forward runs on at most this many tokens at a time
    (runtime/chunking.py; 0: never chunked). None: the transform's default for a coupling,
    0 for ``checkpoint`` and ``offload`` (transformers' checkpointing does not chunk; pass
    it for the exact mode, which does).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    m = Dims.of(config)
    e = dtype_bytes(config, dtype)
    est = Estimate(method)
    _add_constants(est, m, batch, seq, e, loss_head or default_loss_head(method))
    per_layer = [_layer(m, i, batch, seq, e) for i in range(m.layers)]
    if method == "none":
        _add_plain(est, m, batch * seq, per_layer)
    elif method in ("checkpoint", "offload"):
        t, chunk = batch * seq, token_chunk or 0
        recomputed = per_layer
        if 0 < chunk < t:  # the MoE's working set of one chunk, and its whole output
            recomputed = [n - _ffn(m, t, e, i in m.dense_layers)
                          + _ffn(m, chunk, e, i in m.dense_layers) + t * m.hidden * e
                          for i, n in enumerate(per_layer)]
        _add_checkpointed(est, m, t * m.hidden * e, recomputed)
    else:
        sb, bits = stream_layout(config, method, dtype, stream_dtype, exact_streams)
        chunk = TransformOptions().token_chunk if token_chunk is None else token_chunk
        _add_stacks(est, m, batch * seq, e, per_layer, layers, sb, bits, chunk)
    return est


def _add_constants(est: Estimate, m: Dims, batch: int, seq: int, e: int, head: str) -> None:
    """What every method saves outside the decoder layers: token ids, rotary tables, the
    final norm and the loss head (``original`` or ``chunked``)."""
    t = batch * seq
    td = t * m.hidden * e
    p = est.parts
    p["token ids"] = t * 8
    p["rotary tables"] = 2 * seq * m.rope_dim * e
    p["final norm"] = 2 * td + t * 4
    if head == "chunked":
        p["head gradients (hidden, weight)"] = td + m.vocab * m.hidden * e
    else:
        p["head input + fp32 log-softmax"] = td + t * m.vocab * 4
        p["labels"] = t * 8


def _add_plain(est: Estimate, m: Dims, t: int, per_layer: list[int]) -> None:
    """``none``: every layer's activations saved."""
    p = est.parts
    p["layers"] = sum(per_layer)
    # at the start of backward, before any gradient: all saved, logits and their gradient
    est.peak_activation_bytes = sum(p.values()) + 2 * t * m.vocab * 4


def _add_checkpointed(est: Estimate, m: Dims, td: int, per_layer: list[int]) -> None:
    """``checkpoint``: one boundary per layer; ``offload``: the boundaries on the host."""
    p = est.parts
    if est.method == "offload":  # on the host, but for the one being copied back
        est.host_bytes = sum(p.values()) - p["token ids"] + m.layers * td
        for k in ("final norm", "head input + fp32 log-softmax", "labels"):
            p.pop(k, None)
        p["boundary in flight"] = td
    else:
        p["layer boundaries"] = m.layers * td
    # at the end of backward: one layer recomputed
    est.peak_activation_bytes = est.recompute_bytes = max(per_layer) + td


def _add_stacks(est: Estimate, m: Dims, t: int, e: int, per_layer: list[int],
                layers: Sequence[int] | None, sb: int, bits: int, chunk: int = 0) -> None:
    """A coupling: each reversible stack keeps its output (``sb`` bytes per stream element)
    and, with exact streams, ``bits`` per element per scaled update; the layers left out
    save what a plain layer saves. With ``chunk`` < the tokens the feed-forward's
    recompute holds one chunk's working set and its whole output."""
    layout = STACKS[est.method]
    p = est.parts
    td = t * m.hidden * e
    converted = sorted({i for i in (range(m.layers) if layers is None else layers)
                        if 0 <= i < m.layers})
    is_converted = set(converted)  # membership and the sum below in O(layers), not O(layers^2)
    plain = [i for i in range(m.layers) if i not in is_converted]
    stack = t * m.hidden * layout.streams * sb
    p["stack output"] = stack * max(_runs(converted), 1 if not plain else 0)
    if bits:
        p["stored bits"] = (len(converted) * layout.scaled_updates * t * m.hidden
                            * bits // 8)
    if plain:
        p["layers left out"] = sum(per_layer[i] for i in plain)
    # backward at layer i: the plain layers below it are still saved; a converted layer
    # recomputes one branch (the larger: the feed-forward) with the streams and their
    # grads, a plain layer frees its own saved tensors with one boundary gradient
    tc = t if chunk <= 0 or t <= chunk else chunk
    peaks, recomputes, below = [], [], 0
    for i in range(m.layers):
        if i in is_converted:
            dense = i in m.dense_layers
            ffn = _ffn(m, tc, e, dense) + _ffn_backward(m, tc, e, dense) + (td if tc < t else 0)
            # bdia's one update recomputes attention (and the norms) with the feed-forward
            rest = per_layer[i] - _ffn(m, t, e, dense) if layout.whole_layer else 0
            here = rest + ffn + 3 * td + stack
        else:
            here = per_layer[i] + td
        peaks.append(below + here)
        recomputes.append(here)
        if i not in is_converted:
            below += per_layer[i]
    est.peak_activation_bytes = max(peaks)
    est.recompute_bytes = max(recomputes)


def estimate_saved_bytes(config: Any, batch: int, seq: int, method: str,
                         dtype: torch.dtype | str | None = None) -> int:
    """Bytes saved for backward by one training forward of ``method`` (config only)."""
    return estimate(config, batch, seq, method, dtype).saved_bytes


def estimate_parameter_bytes(config: Any, dtype: torch.dtype | str | None = None,
                             method: str = "none") -> int:
    """Parameter bytes, counted on a meta-device model built from ``config`` (no weights);
    revffn adds its adapters (``2*d*d`` per layer)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    m = Dims.of(config)
    if method in STACKS:
        n += STACKS[method].adapters * m.hidden * m.hidden * m.layers
    return n * dtype_bytes(config, dtype)


def estimate_peak_bytes(config: Any, batch: int, seq: int, method: str,
                        dtype: torch.dtype | str | None = None) -> int:
    """Peak of a training step with an ordinary optimizer: parameters + gradients +
    activations at the peak (coarse; for the none method the peak is before gradients)."""
    params = estimate_parameter_bytes(config, dtype, method)
    est = estimate(config, batch, seq, method, dtype)
    if method != "none":
        return 2 * params + est.peak_activation_bytes
    # before any gradient (all activations) or at the end of backward (all gradients)
    m = Dims.of(config)
    last = _layer(m, 0, batch, seq, dtype_bytes(config, dtype))
    return max(params + est.peak_activation_bytes, 2 * params + last)
