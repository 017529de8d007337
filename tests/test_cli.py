"""The `megatron-rl` CLI skeleton: help lists every subcommand, unbuilt ones say so and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import megatron_rl
from megatron_rl import cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "eval", "convert", "plan", "submit", "profile", "serve"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m megatron_rl ARGS` in a fresh interpreter from the repo root."""
    return subprocess.run(
        [sys.executable, "-m", "megatron_rl", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_every_subcommand() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stdout, f"{name} missing from --help:\n{proc.stdout}"
    # ...with its one-line help.
    for name in SUBCOMMANDS:
        assert cli.SUBCOMMANDS[name].help in proc.stdout


def test_table_matches_the_documented_subcommands() -> None:
    assert list(cli.SUBCOMMANDS) == SUBCOMMANDS


def test_no_arguments_prints_help_and_exits_2() -> None:
    proc = run_cli()
    assert proc.returncode == 2
    assert "usage: megatron-rl" in proc.stderr
    for name in SUBCOMMANDS:
        assert name in proc.stderr


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"megatron-rl {megatron_rl.__version__}"


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name: str) -> None:
    proc = run_cli(name, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: megatron-rl {name}" in proc.stdout


@pytest.mark.parametrize("name", [n for n, s in cli.SUBCOMMANDS.items() if s.handler is None])
def test_unbuilt_subcommand_says_so_in_one_line_and_exits_2(name: str) -> None:
    proc = run_cli(name)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    issue = cli.SUBCOMMANDS[name].issue
    assert lines == [f"megatron-rl {name}: not built yet (tracked in issue {issue})"]
    assert proc.stdout == ""


def test_issue_map() -> None:
    issues = {name: sub.issue for name, sub in cli.SUBCOMMANDS.items()}
    assert issues == {
        "train": 7,
        "eval": 7,
        "convert": 5,
        "plan": 9,
        "submit": 9,
        "profile": 8,
        "serve": 6,
    }


def test_train_parses_config_and_overrides() -> None:
    args = cli.build_parser().parse_args(["train", "--set", "parallel.tp=2", "--set", "a.b=c=d"])
    assert args.config == cli.DEFAULT_CONFIG == "configs/tiny_moe_cpu.yaml"
    assert args.overrides == ["parallel.tp=2", "a.b=c=d"]
    args = cli.build_parser().parse_args(["eval", "configs/x.yaml"])
    assert args.config == "configs/x.yaml"
    assert args.overrides == []


def test_bad_override_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--set", "no_equals_sign"])
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_built_handler_is_dispatched(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def handler(args: object) -> int:
        seen["args"] = args
        return 0

    row = cli.SUBCOMMANDS["plan"]
    monkeypatch.setitem(cli.SUBCOMMANDS, "plan", row._replace(handler=handler))
    assert cli.main(["plan", "configs/x.yaml"]) == 0
    assert seen["args"].config == "configs/x.yaml"
    # A built command rejects arguments it does not know.
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--no-such-flag"])
    assert exc.value.code == 2


def test_lazy_handler_path_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    row = cli.SUBCOMMANDS["profile"]
    # "module:function" is imported on dispatch; operator.truth(namespace) is True -> status 1.
    monkeypatch.setitem(cli.SUBCOMMANDS, "profile", row._replace(handler="operator:truth"))
    assert cli.main(["profile"]) == 1
