"""The memory probes on cases with known answers: allocations, frees, views, in-place ops,
saved tensors (deduplicated by storage), parameters and their views excluded."""

from __future__ import annotations

import torch
from torch import nn

from revffn_fx.tools.measure_memory import peak_live_bytes, saved_tensor_bytes

N = 1000  # floats: 4000 bytes


# ------------------------------------------------------------------------------ peak_live_bytes

def test_peak_counts_allocations_that_coexist() -> None:
    def fn() -> list[torch.Tensor]:
        a = torch.empty(N)
        b = torch.empty(N // 2)
        return [a, b]

    assert peak_live_bytes(fn)[0] == 4 * N + 2 * N


def test_peak_sees_frees() -> None:
    def fn() -> torch.Tensor:
        a = torch.empty(N)
        b = torch.empty(N)
        del a  # freed: the next allocation fits in the same budget
        c = torch.empty(N)
        return b + c  # a third live tensor: 3 * 4N at the peak

    assert peak_live_bytes(fn)[0] == 3 * 4 * N


def test_views_and_in_place_results_are_not_allocations() -> None:
    before = torch.ones(N)

    def fn() -> torch.Tensor:
        v = before.view(10, N // 10).t()
        v.add_(1.0)
        fresh = torch.zeros(N)
        return fresh.view(-1)[: N // 2]  # a view of a fresh tensor: counted once

    assert peak_live_bytes(fn)[0] == 4 * N


def test_baseline_is_added_once_per_storage() -> None:
    p = nn.Parameter(torch.ones(N))
    peak, _ = peak_live_bytes(lambda: p.view(-1) * 2, baseline=[p, p, p.detach()])
    assert peak == 4 * N + 4 * N  # the parameter once, the product once


def test_training_step_of_a_linear_layer() -> None:
    lin = nn.Linear(64, 32, bias=False)
    x = torch.randn(8, 64)

    def step() -> None:
        lin(x).sum().backward()

    peak, _ = peak_live_bytes(step, baseline=list(lin.parameters()))
    weight, out = 64 * 32 * 4, 8 * 32 * 4
    # parameters + their gradient + the output (and a few scalars), never a weight twice
    assert 2 * weight <= peak <= 2 * weight + 2 * out + 64, peak


# --------------------------------------------------------------------------- saved_tensor_bytes

def test_saved_result_counted() -> None:
    x = torch.randn(N, requires_grad=True)
    assert saved_tensor_bytes(lambda: x.exp())[0] == 4 * N  # exp saves its result


def test_saved_storage_deduplicated_across_ops_and_views() -> None:
    x = torch.randn(N, requires_grad=True)

    def fn() -> torch.Tensor:
        a = x.exp()                  # saves a
        b = a * a                    # saves a twice more
        return b + a.view(10, -1).sin().view(-1)  # sin saves a view of a

    assert saved_tensor_bytes(fn)[0] == 4 * N


def test_parameters_and_their_views_are_excluded() -> None:
    lin = nn.Linear(256, 128, bias=False)  # linear saves its input and weight.t() (a view)
    x = torch.randn(4, 256, requires_grad=True)
    assert saved_tensor_bytes(lambda: lin(x))[0] == x.numel() * 4
    p = lin.weight
    assert saved_tensor_bytes(lambda: (p * p).sum())[0] == 0


def test_exclude_by_id() -> None:
    x = torch.randn(N, requires_grad=True)
    y = torch.randn(N)
    assert saved_tensor_bytes(lambda: x * y)[0] == 4 * N  # mul saves y for x's gradient
    assert saved_tensor_bytes(lambda: x * y, exclude={id(y)})[0] == 0


def test_nothing_saved_without_grad() -> None:
    x = torch.randn(N, requires_grad=True)
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x.exp() * x)[0] == 0
