"""The command line explains itself: help on every option, and bare `qawatch` shows help."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import CALL_TIMEOUT_S, QAWATCH

from daemon.cli import build_parser


def options(parser: argparse.ArgumentParser, path: str = "qawatch") -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:  # argparse has no public walk over its actions
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{path} {name}")
        elif action.option_strings:
            yield path, action


def test_every_option_of_every_command_has_help() -> None:
    """1. every option of every command and subcommand 2. each has a help text."""
    found = list(options(build_parser()))
    assert len(found) > 40
    missing = [f"{path} {'/'.join(action.option_strings)}" for path, action in found if not action.help]
    assert missing == []


def test_bare_qawatch_shows_help(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """1. `qawatch` with no arguments 2. the help, listing the commands, exit 0."""
    result = subprocess.run(
        QAWATCH,
        capture_output=True,
        text=True,
        env=subprocess_env,
        cwd=tmp_path,
        timeout=CALL_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: qawatch")
    for command in ("run", "watch", "ask", "check-config", "simulate", "dead-letters"):
        assert command in result.stdout
    assert result.stderr == ""


def test_generated_bash_completion_completes_commands_and_options(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    """1. `qawatch completion bash` 2. sourced in a real bash 3. `qawatch wa<TAB>` gives watch,
    `qawatch check-config --check<TAB>` gives --check-api."""
    script = subprocess.run(
        [*QAWATCH, "completion", "bash"],
        capture_output=True,
        text=True,
        env=subprocess_env,
        cwd=tmp_path,
        check=True,
    ).stdout
    (tmp_path / "qawatch.bash").write_text(script)
    probe = (
        "source qawatch.bash\n"
        'COMP_WORDS=(qawatch wa); COMP_CWORD=1; _shtab_qawatch; echo "${COMPREPLY[*]}"\n'
        'COMP_WORDS=(qawatch check-config --check); COMP_CWORD=2; _shtab_qawatch; echo "${COMPREPLY[*]}"\n'
    )
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.splitlines() == ["watch", "--check-api"]
