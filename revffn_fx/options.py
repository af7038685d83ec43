"""The transform's options, checked without importing torch (the CLI answers bad input fast)."""

from __future__ import annotations

from .errors import RevFFNError


def parse_layer_spec(spec: str) -> list[int]:
    """``"0-3,6"`` -> ``[0, 1, 2, 3, 6]``: the syntax of a layer selection.

    Raises RevFFNError("bad layer spec ...") for anything else: empty parts only, a
    reversed range (``5-2``), negative or non-integer numbers. The range is checked
    against the model later.
    """
    out: set[int] = set()
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    for part in parts:
        lo, sep, hi = part.partition("-")
        ok = lo.strip().isdigit() and (not sep or hi.strip().isdigit())
        if ok and sep and int(lo) > int(hi):
            ok = False
        if not ok:
            break
        out.update(range(int(lo), int(hi) + 1) if sep else (int(lo),))
    else:
        if parts:
            return sorted(out)
    raise RevFFNError(f"bad layer spec {spec!r}: use e.g. '0-3,6'")
