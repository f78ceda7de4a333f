"""Fixtures of the ``svdfarm`` command's tests: the environment of a command run as a real
subprocess, on a data folder of the test's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli import main
from svdfarm.settings import Settings

#: Who the commands of the in-process tests act as (their events name them).
OPERATOR = "ops-alice"


@pytest.fixture
def cli_env(tmp_path: Path, tiny_model_dir: Path) -> dict[str, str]:
    """This process's environment with the data folder ``tmp_path/var`` (its default SQLite
    database and embedded broker) and the session's tiny model as ``SVDFARM_MODEL=tiny``."""
    data_dir = tmp_path / "var"
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    return {
        **os.environ,
        "SVDFARM_DATA_DIR": str(data_dir),
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_DATABASE_URL": "",
        "SVDFARM_BROKER_URL": "",
    }


@pytest.fixture
def farm_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point ``svdfarm`` run in this process at the test's data folder, database, embedded
    broker and dispatch margin, acting as :data:`OPERATOR`."""
    monkeypatch.setenv("SVDFARM_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("SVDFARM_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("SVDFARM_BROKER_URL", settings.broker_url)
    monkeypatch.setenv("SVDFARM_MODEL", "tiny")
    monkeypatch.setenv("SVDFARM_DISPATCH_MARGIN", str(settings.dispatch_margin))
    monkeypatch.setenv("LOGNAME", OPERATOR)
    monkeypatch.setenv("USER", OPERATOR)
    return settings


def svdfarm(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``svdfarm ARGS`` in this process: (exit status, stdout, stderr)."""
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err
