"""Fixtures of the ``svdfarm`` command's tests: the environment of a command run as a real
subprocess, on a data folder of the test's own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
