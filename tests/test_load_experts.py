"""rf.load(..., experts_implementation=...): exports of any dtype run a forward on the CPU."""

from __future__ import annotations

import pytest
import torch
from zoo import tiny_model

import revffn_fx as rf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_exports_of_any_dtype_run(tmp_path, dtype: torch.dtype) -> None:
    rev = rf.transform(tiny_model("mixtral", dtype=dtype), coupling="revffn").eval()
    rev.save_pretrained(tmp_path / "out")
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        want = rev(ids).logits
        for impl in (None, "eager"):
            kw = {} if impl is None else {"experts_implementation": impl}
            got = rf.load(tmp_path / "out", **kw)
            assert next(got.parameters()).dtype == dtype
            if impl is None:  # the implementation it was saved with: bit for bit
                torch.testing.assert_close(got(ids).logits, want, rtol=0, atol=0)
            else:  # another kernel: another rounding in bf16
                assert got.model.config._experts_implementation == impl
                torch.testing.assert_close(got(ids).logits, want, rtol=2e-2, atol=2e-2)
