"""What every ``svdfarm`` command shares (:mod:`cli`): the model rule as the commands apply
it, a reader that stops reading, and the help texts."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest

from cli import build_parser, main, settle_model
from svdfarm.settings import DEFAULT_MODEL, load_settings
from tests.processes import SVDFARM


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple]:
    """Every command line that reaches a parser of its own: ``(), ("jobs",), ("jobs", "list")``."""
    found: list[tuple] = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


def test_help_texts_are_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` of every command and subcommand prints its own usage, with no reST markup
    (double backticks) from a docstring."""
    commands = _commands(build_parser())
    assert ("admin", "hash-password") in commands and ("db", "upgrade") in commands
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        assert done.value.code == 0
        printed = capsys.readouterr().out
        assert printed.startswith(f"usage: {' '.join(('svdfarm', *command))}"), printed
        assert "``" not in printed, (command, printed)


def test_admin_hash_password_help_is_its_own(capsys: pytest.CaptureFixture[str]) -> None:
    """``svdfarm admin hash-password --help`` says what that command does, not the parent's
    usage."""
    with pytest.raises(SystemExit):
        main(["admin", "hash-password", "--help"])
    printed = capsys.readouterr().out
    assert printed.startswith("usage: svdfarm admin hash-password [-h]")
    assert "SVDFARM_ADMIN_PASSWORD" in printed


@pytest.mark.parametrize("argv", [["jobs", "list"], ["jobs", "list", "--json"]])
def test_a_reader_that_stops_reading_ends_the_command_quietly(
    argv: list[str], cli_env: dict[str, str]
) -> None:
    """``svdfarm ... | head``: output to a pipe nobody reads any more ends the command with
    status 1 and no traceback, whatever the command."""
    subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, check=True, capture_output=True)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    try:
        done = subprocess.run(
            [*SVDFARM, *argv],
            env=cli_env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr


def test_the_chosen_model_is_printed_and_handed_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command that runs a model prints the rule's choice and exports it in SVDFARM_MODEL,
    so the web and the worker it starts (and the Celery app) run the same one."""
    monkeypatch.setenv("SVDFARM_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SVDFARM_BROKER_URL", "")
    monkeypatch.delenv("SVDFARM_MODEL", raising=False)
    monkeypatch.setattr("cli.gpus.cuda_device_count", lambda: 0)
    settings = settle_model(load_settings())
    assert settings.model == "tiny" == os.environ["SVDFARM_MODEL"]
    assert capsys.readouterr().err == "model: tiny (no GPU and SVDFARM_MODEL unset)\n"
    assert load_settings().model == "tiny"  # what a child process reads
    monkeypatch.delenv("SVDFARM_MODEL")
    monkeypatch.setattr("cli.gpus.cuda_device_count", lambda: 1)
    assert settle_model(load_settings()).model == DEFAULT_MODEL
    assert settle_model(load_settings(), given="/models/x").model == "/models/x"
    assert capsys.readouterr().err.splitlines()[-1] == "model: /models/x (--model)"


@pytest.mark.parametrize("command", [["jobs", "list"], ["users", "add", "bob"], ["keys", "list"]])
def test_a_database_not_migrated_is_named_not_a_traceback(
    cli_env: dict[str, str], command: list[str]
) -> None:
    """On a fresh data folder (no tables yet) a command says to run ``svdfarm db upgrade``
    in one line and exits 2, writing nothing; after the upgrade the same command works."""
    done = subprocess.run([*SVDFARM, *command], env=cli_env, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "error: the database has no svdfarm tables yet, or an older schema: run "
        "`svdfarm db upgrade` first (`svdfarm up` does it on its own)."
    )
    assert "Traceback" not in done.stderr
    upgraded = subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, capture_output=True)
    assert upgraded.returncode == 0, upgraded.stderr
    again = subprocess.run([*SVDFARM, *command], env=cli_env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
