"""One exit-status mapping for every command; who is to blame when a pass fails.

A refusal of the user's model (RevFFNError) exits 2; a bug inside one of revffn-fx's own
passes exits 1 (InternalError), even when it is raised through the PassManager; a user's
own pass that crashes is the user's problem (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx as fx
from click.testing import CliRunner

import revffn_fx.passes.pipeline
from revffn_fx import cli
from revffn_fx.cli_bench import bench_command
from revffn_fx.errors import InternalError, RevFFNError
from revffn_fx.exits import Command
from revffn_fx.passes.manager import PassManager, is_builtin

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mixtral"


def _graph() -> fx.GraphModule:
    return fx.symbolic_trace(torch.nn.Linear(2, 2))


def _crash(gm: fx.GraphModule) -> fx.GraphModule:
    raise KeyError("no such node")


def test_a_crash_in_a_builtin_pass_is_a_bug_in_a_user_pass_the_users() -> None:
    assert not is_builtin(_crash)
    with pytest.raises(RevFFNError, match="pass _crash failed: KeyError"):
        PassManager([_crash])(_graph())

    def ours(gm: fx.GraphModule) -> fx.GraphModule:
        raise KeyError("no such node")

    ours.__module__ = "revffn_fx.passes.couple"  # as if defined there
    assert is_builtin(ours)
    with pytest.raises(InternalError, match="built-in pass ours failed: KeyError") as err:
        PassManager([ours])(_graph())
    assert not isinstance(err.value, RevFFNError)
    ours_returns = lambda gm: 3  # noqa: E731 - a pass returning nonsense
    ours_returns.__module__ = "revffn_fx.model"
    with pytest.raises(InternalError, match="returned int"):
        PassManager([ours_returns])(_graph())


def test_a_refusal_inside_a_builtin_pass_stays_the_users() -> None:
    def refuse(gm: fx.GraphModule) -> fx.GraphModule:
        raise RevFFNError("layer 3 is not convertible: reasons")

    refuse.__module__ = "revffn_fx.passes.couple"
    with pytest.raises(RevFFNError, match="layer 3 is not convertible"):
        PassManager([refuse])(_graph())


def test_bug_in_the_couple_pass_exits_1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`revffn transform` with a crashing built-in pass: exit 1 and the bug line (was 2)."""
    def crash(*args: object, **kwargs: object) -> None:
        raise KeyError("no such node")

    monkeypatch.setattr(revffn_fx.passes.pipeline, "couple_layer", crash)
    res = CliRunner().invoke(cli.main, ["transform", str(EXAMPLE), str(tmp_path / "out"),
                                        "--dry-run"])
    assert res.exit_code == 1, res.output
    first = res.stderr.splitlines()[0]
    assert first.startswith("error: internal error, a bug in revffn-fx: InternalError: "
                            "built-in pass couple"), first
    assert "failed: KeyError" in first
    assert not (tmp_path / "out").exists()


def test_every_command_shares_the_mapping() -> None:
    """bench is a revffn Command: on its own it answers bad input as the group does."""
    commands = [*cli.main.commands.values(), cli.transform_main]
    assert all(isinstance(c, Command) for c in commands), [c.name for c in commands]
    assert bench_command in commands
    res = CliRunner().invoke(bench_command, ["--synthetic", "nosuch"])
    assert res.exit_code == 2
    assert res.stderr.startswith("error: unknown synthetic model 'nosuch'")
    assert res.stderr.count("\n") == 1
