"""The package surface: every public name resolves, and the CLI starts without torch."""

from __future__ import annotations

import subprocess
import sys

import revffn_fx as rf


def test_public_names_resolve() -> None:
    assert set(rf.__all__) == set(rf._WHERE) | {"passes"}
    for name in rf.__all__:
        assert getattr(rf, name) is not None, name


def test_cli_imports_without_torch() -> None:
    # `revffn --help` must answer at once: torch and transformers load on first use only
    code = "import sys, revffn_fx.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
