"""The refusal zoo: hand-written decoder layers that are not a sequence of residual updates,
with the verdict the analysis must give each (and the layers it must still accept)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import HandBlock, HandMoE

import revffn_fx as rf
from revffn_fx.errors import ConversionError


class Before(HandBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * 2.0
        x = x + self.attn(self.attn_norm(x), mask)
        return x + self.moe(self.moe_norm(x))


class Between(HandBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        x = torch.tanh(x)
        return x + self.moe(self.moe_norm(x))


class After(HandBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), mask)
        x = x + self.moe(self.moe_norm(x))
        return x * 0.5


class OffTrunk(HandBlock):
    """Two residuals taken from the input and multiplied: neither is on the trunk."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = x + self.attn(self.attn_norm(x), mask)
        b = x + self.moe(self.moe_norm(x))
        return a * b


class NoResidual(HandBlock):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.moe(self.moe_norm(self.attn(self.attn_norm(x), mask)))


def _with_blocks(cls: type[nn.Module]) -> HandMoE:
    model = HandMoE()
    for i, old in enumerate(model.blocks):
        new = cls(64, 4, 96, 4, 2)
        new.load_state_dict(old.state_dict())
        model.blocks[i] = new
    return model


REFUSED = {
    Before: "before the first branch",
    Between: "between the branches",
    After: "after the last branch",
    OffTrunk: "not of the form x + f(x)",
    NoResidual: "no residual connection",
}


@pytest.mark.parametrize("cls", list(REFUSED), ids=lambda c: c.__name__)
def test_refused_forms_name_what_is_wrong(cls: type[nn.Module]) -> None:
    model = _with_blocks(cls)
    plan = rf.analyze(rf.trace(model))
    for lp in plan.layers:
        assert not lp.convertible
        assert REFUSED[cls] in lp.reason, lp.reason
    with pytest.raises(ConversionError, match="no convertible decoder layer"):
        rf.transform(model)


def test_accepted_form_stays_accepted() -> None:
    plan = rf.analyze(rf.trace(_with_blocks(HandBlock)))
    assert [lp.convertible for lp in plan.layers] == [True, True]
    assert [lp.kinds for lp in plan.layers] == [["attention", "moe"]] * 2
