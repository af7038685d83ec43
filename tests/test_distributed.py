"""A RevModel on 2 CPU ranks (gloo): DDP and FSDP2 per-layer sharding give the gradients of
one process on the concatenated batch, and the fused optimizer steps on reduced gradients.

One spawn of 2 processes runs every case (starting processes dominates the cost); each rank
writes its measured errors, and the tests below assert on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import spawn, start_rank

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not built", allow_module_level=True)

WORLD = 2
STEPS = 3
COUPLINGS = ("revffn", "revnet")


def _ids(step: int) -> torch.Tensor:
    """The global batch of a step: 2 rows per rank, 8 tokens."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (2 * WORLD, 8), generator=g)


def _model(coupling: str) -> torch.nn.Module:
    from zoo import tiny_model

    import revffn_fx as rf

    m = tiny_model("mixtral", dtype=torch.float64)  # fp64: eager experts (zoo sets them)
    return rf.transform(m, coupling=coupling).train()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _max_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return max(float((_full(got[k]).detach() - want[k]).abs().max() / want[k].abs().max()
                     .clamp_min(1e-30)) for k in want)


def _reference(coupling: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One process, whole batch: first-step gradients, parameters after STEPS AdamW steps."""
    rev = _model(coupling)
    opt = torch.optim.AdamW(rev.parameters(), lr=1e-2, weight_decay=0.1)
    grads = {}
    for step in range(STEPS):
        ids = _ids(step)
        rev(ids, labels=ids).loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in rev.named_parameters()}
        opt.step()
        opt.zero_grad()
    return grads, {n: p.detach().clone() for n, p in rev.named_parameters()}


def _worker(rank: int, tmp: str) -> None:
    mesh = start_rank(rank, tmp, WORLD)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from revffn_fx import distributed as rd
    from revffn_fx.errors import RevFFNError
    from revffn_fx.training import fuse_optimizer

    out: dict[str, Any] = {}

    def local(step: int) -> torch.Tensor:
        return _ids(step)[2 * rank:2 * rank + 2]

    for coupling in COUPLINGS:
        ref_grads, ref_params = _reference(coupling)
        # DDP: gradients, then the fused optimizer through DDP's comm hook
        ddp = DDP(_model(coupling))
        ddp(local(0), labels=local(0)).loss.backward()
        out[f"ddp_grad_{coupling}"] = _max_err(
            {n: p.grad for n, p in ddp.module.named_parameters()}, ref_grads)
        ddp = DDP(_model(coupling))
        fused = fuse_optimizer(ddp, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        for step in range(STEPS):
            ddp(local(step), labels=local(step)).loss.backward()
            fused.step()
        out[f"ddp_fused_{coupling}"] = _max_err(dict(ddp.module.named_parameters()),
                                                ref_params)
        # FSDP2, one unit per converted layer
        rev = rd.shard(_model(coupling), mesh)
        layer_params = [p for i in rev.converted
                        for p in rev.traced.layers[i].module.parameters()]
        out[f"fsdp_local_fraction_{coupling}"] = (
            rd.local_numel(layer_params) / sum(p.numel() for p in layer_params))
        rev(local(0), labels=local(0)).loss.backward()
        out[f"fsdp_grad_{coupling}"] = _max_err(
            {n: p.grad for n, p in rev.named_parameters()}, ref_grads)
        with torch.no_grad():  # eval: each layer gathered, run as plain modules, resharded
            got = rev.eval()(local(0)).logits
            want = _model(coupling).eval()(local(0)).logits
        out[f"fsdp_eval_{coupling}"] = float((got - want).abs().max() / want.abs().max())
        rev = rd.shard(_model(coupling), mesh)
        opt = torch.optim.AdamW(rev.parameters(), lr=1e-2, weight_decay=0.1)
        for step in range(STEPS):
            rev(local(step), labels=local(step)).loss.backward()
            opt.step()
            opt.zero_grad()
        out[f"fsdp_adamw_{coupling}"] = _max_err(dict(rev.named_parameters()), ref_params)
        rev = rd.shard(_model(coupling), mesh)
        fused = fuse_optimizer(rev, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
        in_backward: list[int] = []  # stepped right after their layer's reduce-scatter
        sink = rev.options.reduced_sink
        rev.options.reduced_sink = lambda p, _n=in_backward, _s=sink: (
            _n.append(p.to_local().numel()), _s(p))
        for step in range(STEPS):
            rev(local(step), labels=local(step)).loss.backward()
            fused.step()
        out[f"fsdp_fused_{coupling}"] = _max_err(dict(rev.named_parameters()), ref_params)
        out[f"fsdp_fused_grads_left_{coupling}"] = sum(
            p.grad is not None for p in rev.parameters())
        out[f"fsdp_fused_in_backward_{coupling}"] = sum(in_backward) / STEPS / rd.local_numel(
            [p for i in rev.converted for m in (rev.traced.layers[i].module,
                                                 rev.adapters[str(i)] if str(i) in rev.adapters
                                                 else torch.nn.Module())
             for p in m.parameters()])
    # a layer left out between two stacks, under checkpointing: an ordinary FSDP2 unit
    from zoo import tiny_model

    import revffn_fx as rf

    def partial() -> torch.nn.Module:
        m = tiny_model("mixtral", dtype=torch.float64, num_hidden_layers=3)
        return rf.transform(m, layers="0,2", checkpoint_rest=True).train()

    ref = partial()
    ref(_ids(0), labels=_ids(0)).loss.backward()
    rev = rd.shard(partial(), mesh)
    rev(local(0), labels=local(0)).loss.backward()
    out["fsdp_partial_stacks"] = len(rev.stacks())
    out["fsdp_partial"] = _max_err({n: p.grad for n, p in rev.named_parameters()},
                                   {n: p.grad for n, p in ref.named_parameters()})
    # gradient accumulation: the first micro-batch without reduction, the second with it
    ref = _model("revffn")
    for step in (0, 1):
        ref(_ids(step), labels=_ids(step)).loss.backward()
    rev = rd.shard(_model("revffn"), mesh)
    for step in (0, 1):
        rev.set_requires_gradient_sync(step == 1)
        rev(local(step), labels=local(step)).loss.backward()
    out["fsdp_accumulate"] = _max_err({n: p.grad for n, p in rev.named_parameters()},
                                      {n: p.grad for n, p in ref.named_parameters()})
    # the FSDP2 recipe applied by hand (or by accelerate): fully_shard on each decoder layer,
    # then on the RevModel; the stacks adopt those units
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ref_grads, _ = _reference("revffn")
    rev = rd.prepare(_model("revffn"))
    for layer in rev.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(rev, mesh=mesh)
    rev(local(0), labels=local(0)).loss.backward()
    out["recipe_grad"] = _max_err({n: p.grad for n, p in rev.named_parameters()}, ref_grads)
    # mixed precision: bf16 parameters for compute, fp32 gradients reduced in fp32
    ref = rf.transform(tiny_model("mixtral")).train()  # fp32 (an fp64 model cast to fp32
    ref(_ids(0), labels=_ids(0)).loss.backward()  # routes some tokens differently in bf16)
    mp32 = {n: p.grad for n, p in ref.named_parameters()}
    rev = rf.transform(tiny_model("mixtral")).train()
    rd.shard(rev, mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                       reduce_dtype=torch.float32))
    rev(local(0), labels=local(0)).loss.backward()
    out["bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in rev.parameters()})
    out["bf16_grad_rel_norm_err"] = max(
        float((_full(p.grad).detach() - mp32[n]).norm() / mp32[n].norm())
        for n, p in rev.named_parameters())
    # fully_shard on a module the branches call directly is refused
    rev = _model("revffn")
    fully_shard(rev.model.model.layers[0].self_attn, mesh=mesh)
    fully_shard(rev, mesh=mesh)
    try:
        rev(local(0), labels=local(0))
        out["refuse_branch_unit"] = ""
    except RevFFNError as e:
        out["refuse_branch_unit"] = str(e)
    # refusals: the fused optimizer on the model inside DDP; FSDP1
    rev = _model("revffn")
    fused = fuse_optimizer(rev, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    ddp = DDP(rev)
    try:
        ddp(local(0), labels=local(0))
        out["refuse_ddp_inner"] = ""
    except RevFFNError as e:
        out["refuse_ddp_inner"] = str(e)
    # ... unless attached to the DDP module afterwards (what FusedOptimizerTrainer does)
    fused.attach_ddp(ddp)
    for step in range(STEPS):
        ddp(local(step), labels=local(step)).loss.backward()
        fused.step()
    out["ddp_attached"] = _max_err(dict(ddp.module.named_parameters()), _reference("revffn")[1])
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    try:
        wrapped = FSDP1(_model("revffn"), device_id=torch.device("cpu"))
        wrapped(local(0), labels=local(0)).loss.backward()
        out["refuse_fsdp1"] = ""
    except RevFFNError as e:
        out["refuse_fsdp1"] = str(e)
    rev = _model("revffn")
    rev(local(0), labels=local(0)).loss.backward()  # compiled before wrapping
    try:
        FSDP1(rev, device_id=torch.device("cpu"))(local(0), labels=local(0)).loss.backward()
        out["refuse_fsdp1_compiled"] = ""
    except RevFFNError as e:
        out["refuse_fsdp1_compiled"] = str(e)
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_worker, tmp_path_factory.mktemp("dist"), WORLD, "rank")


@pytest.mark.slow
@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_gradients_equal_one_process(results: list[dict[str, Any]], wrapper: str,
                                     coupling: str) -> None:
    for r in results:
        assert r[f"{wrapper}_grad_{coupling}"] <= 1e-10
        if wrapper == "fsdp":
            assert r[f"fsdp_eval_{coupling}"] <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("coupling", COUPLINGS)
@pytest.mark.parametrize("case", ["ddp_fused", "fsdp_adamw", "fsdp_fused"])
def test_three_steps_equal_one_process_adamw(results: list[dict[str, Any]], case: str,
                                             coupling: str) -> None:
    for r in results:
        assert r[f"{case}_{coupling}"] <= 1e-10
        if case == "fsdp_fused":  # every gradient was stepped and freed; the layers'
            assert r[f"fsdp_fused_grads_left_{coupling}"] == 0  # inside the backward
            assert r[f"fsdp_fused_in_backward_{coupling}"] == 1.0


@pytest.mark.slow
def test_fsdp_gradient_accumulation(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["fsdp_accumulate"] <= 1e-10


@pytest.mark.slow
def test_fsdp_with_a_checkpointed_layer_between_stacks(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["fsdp_partial_stacks"] == 2
        assert r["fsdp_partial"] <= 1e-10


@pytest.mark.slow
def test_fully_shard_recipe_is_adopted(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["recipe_grad"] <= 1e-10
        assert "call directly" in r["refuse_branch_unit"]


@pytest.mark.slow
def test_bf16_mixed_precision(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["bf16_grad_dtypes"] == ["torch.float32"]
        assert r["bf16_grad_rel_norm_err"] < 0.05  # bf16 compute; measured 0.012


@pytest.mark.slow
@pytest.mark.parametrize("coupling", COUPLINGS)
def test_each_rank_holds_its_share_of_the_layers(results: list[dict[str, Any]],
                                                 coupling: str) -> None:
    for r in results:
        assert abs(r[f"fsdp_local_fraction_{coupling}"] - 1 / WORLD) < 0.02


@pytest.mark.slow
def test_unsupported_wrappers_are_refused(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert "fuse_optimizer(ddp_model" in r["refuse_ddp_inner"]
        assert r["ddp_attached"] <= 1e-10
        assert "FSDP1" in r["refuse_fsdp1"]
        assert "FSDP1" in r["refuse_fsdp1_compiled"]


def test_parameters_swapped_after_forward_get_their_gradients() -> None:
    """What FSDP2 does between the forward and the backward, without a process group: the
    registered parameter objects change; the stack finds the new ones on their modules."""
    ids = _ids(0)
    ref = _model("revffn")
    ref(ids, labels=ids).loss.backward()
    rev = _model("revffn")
    loss = rev(ids, labels=ids).loss
    attn = rev.model.model.layers[0].self_attn.q_proj
    old = attn.weight
    attn.weight = torch.nn.Parameter(old.detach().clone())
    loss.backward()
    want = ref.model.model.layers[0].self_attn.q_proj.weight.grad
    assert old.grad is None
    torch.testing.assert_close(attn.weight.grad, want, rtol=1e-12, atol=1e-14)


# -- after training: checkpoints of sharded models and of the fused optimizer -----------------

SAVE_TIMEOUT = 3.0  # seconds a sharded save waits for the other ranks (default 30)


def _checkpoint_worker(rank: int, tmp: str) -> None:
    mesh = start_rank(rank, tmp, WORLD)
    import time

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from zoo import tiny_model

    import revffn_fx as rf
    from revffn_fx import distributed as rd
    from revffn_fx.errors import RevFFNError
    from revffn_fx.training import fuse_optimizer

    out: dict[str, Any] = {}

    def local(step: int) -> torch.Tensor:
        return _ids(step)[2 * rank:2 * rank + 2]

    def fused_run() -> tuple[torch.nn.Module, Any]:
        rev = rd.shard(_model("revffn"), mesh)
        return rev, fuse_optimizer(rev, torch.optim.AdamW, lr=1e-2, weight_decay=0.1)

    def steps(rev: torch.nn.Module, opt: Any, first: int) -> None:
        for step in range(first, first + STEPS):
            rev(local(step), labels=local(step)).loss.backward()
            opt.step()

    # DCP: model and fused-optimizer state after 3 steps, saved, loaded into a fresh run,
    # 3 more steps: the same parameters as 6 steps without the round trip
    rev, opt = fused_run()
    steps(rev, opt, 0)
    ckpt = f"{tmp}/dcp"
    dcp.save({"model": get_model_state_dict(rev), "optim": get_optimizer_state_dict(rev, opt)},
             checkpoint_id=ckpt)
    out["dcp_state_keys"] = sorted(get_optimizer_state_dict(rev, opt)["state"])[:1]
    steps(rev, opt, STEPS)
    want = {n: _full(p).detach().clone() for n, p in rev.named_parameters()}
    rev2, opt2 = fused_run()
    state = {"model": get_model_state_dict(rev2), "optim": get_optimizer_state_dict(rev2, opt2)}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(rev2, state["model"])
    set_optimizer_state_dict(rev2, opt2, state["optim"])
    steps(rev2, opt2, STEPS)
    out["dcp_resume"] = _max_err(dict(rev2.named_parameters()), want)
    # save_pretrained on every rank: gathered, rank 0 writes a loadable export
    t = time.monotonic()
    rev.save_pretrained(f"{tmp}/export")
    out["save_s"] = time.monotonic() - t
    dist.barrier()
    if rank == 0:
        loaded = rf.load(f"{tmp}/export")
        out["save_loaded"] = _max_err(dict(loaded.named_parameters()), want)
        out["save_still_sharded"] = rd.has_dtensors(rev)
    # ... on rank 0 only: refused within the timeout, no hang
    if rank == 0:
        t = time.monotonic()
        try:
            rev.save_pretrained(f"{tmp}/export-rank0", sync_timeout=SAVE_TIMEOUT)
            out["save_rank0_only"] = ""
        except RevFFNError as e:
            out["save_rank0_only"] = str(e)
        out["save_rank0_only_s"] = time.monotonic() - t
    # ... with a full state dict gathered by the caller (accelerate, the Trainer): one rank
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    full = get_model_state_dict(rev, options=StateDictOptions(full_state_dict=True,
                                                              cpu_offload=True))
    if rank == 0:
        rev.save_pretrained(f"{tmp}/export-sd", state_dict=full)
        out["save_state_dict"] = _max_err(dict(rf.load(f"{tmp}/export-sd").named_parameters()),
                                          want)
    dist.barrier()
    # fully_shard on the decoder layers without the root: refused, saying what to do
    rev = rd.prepare(_model("revffn"))
    for layer in rev.model.model.layers:
        fully_shard(layer, mesh=mesh)
    try:
        rev(local(0), labels=local(0)).loss.backward()
        out["refuse_no_root"] = ""
    except RevFFNError as e:
        out["refuse_no_root"] = str(e)
    # mixed dtypes (DeepSeek-V3 keeps its router in fp32 in a bf16 model): named, or cast
    def deepseek() -> torch.nn.Module:
        return rf.transform(tiny_model("deepseek_v3", dtype=torch.bfloat16)).train()

    try:
        rd.shard(deepseek(), mesh)
        out["mixed_error"] = ""
    except RevFFNError as e:
        out["mixed_error"] = str(e)
    import warnings

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rev = rd.shard(deepseek(), mesh, mixed_dtypes="cast")
    loss = rev(local(0), labels=local(0)).loss
    loss.backward()
    out["mixed_cast_loss"] = float(loss)
    out["mixed_cast_dtypes"] = sorted({str(p.dtype) for p in rev.parameters()})
    Path(tmp, f"ckpt{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return spawn(_checkpoint_worker, tmp_path_factory.mktemp("ckpt"), WORLD, "ckpt")


@pytest.mark.slow
def test_dcp_resume_of_the_fused_optimizer_is_exact(checkpoints: list[dict[str, Any]]) -> None:
    for r in checkpoints:
        assert r["dcp_state_keys"] == ["adapters.0.F_down.weight"]  # by parameter name
        assert r["dcp_resume"] == 0.0


@pytest.mark.slow
def test_sharded_save_pretrained_gathers_or_refuses(checkpoints: list[dict[str, Any]]) -> None:
    r0 = checkpoints[0]
    assert r0["save_loaded"] == 0.0 and r0["save_still_sharded"]
    assert r0["save_state_dict"] == 0.0
    assert "every rank" in r0["save_rank0_only"]
    assert r0["save_rank0_only_s"] < SAVE_TIMEOUT + 5


@pytest.mark.slow
def test_fully_shard_without_the_root_and_mixed_dtypes(checkpoints: list[dict[str, Any]]) -> None:
    for r in checkpoints:
        assert "fully_shard(rev)" in r["refuse_no_root"]
        assert "mlp.gate.weight (float32)" in r["mixed_error"]
        assert "mixed_dtypes='cast'" in r["mixed_error"]
        assert r["mixed_cast_dtypes"] == ["torch.bfloat16"]
        assert r["mixed_cast_loss"] == r["mixed_cast_loss"]  # finite
