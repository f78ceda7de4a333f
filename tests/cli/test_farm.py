"""``svdfarm db`` and ``svdfarm admin`` (:mod:`cli.farm`), run as real subprocesses."""

from __future__ import annotations

import subprocess
from pathlib import Path

from sqlalchemy import create_engine, inspect

from svdfarm.settings import is_password_hash
from tests.processes import SVDFARM


def test_db_upgrade_creates_tables(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``svdfarm db upgrade`` migrates the default SQLite database in the data folder."""
    done = subprocess.run([*SVDFARM, "db", "upgrade"], env=cli_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    engine = create_engine(f"sqlite:///{tmp_path / 'var' / 'svdfarm.db'}")
    assert {"jobs", "attempts", "workers"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_db_says_where_without_the_password() -> None:
    """What ``svdfarm db`` and ``up`` print of a URL keeps everything but the password."""
    from cli import redact

    assert redact("postgresql+psycopg://svd:s3cret@db:5432/farm") == (
        "postgresql+psycopg://svd:***@db:5432/farm"
    )
    assert redact("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"


def test_admin_hash_password_reads_stdin(cli_env: dict[str, str]) -> None:
    """Piped in, a password comes back as a hash production accepts; an empty one is refused
    with status 1."""
    done = subprocess.run(
        [*SVDFARM, "admin", "hash-password"],
        input="correct horse\n",
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert is_password_hash(done.stdout.strip())
    empty = subprocess.run(
        [*SVDFARM, "admin", "hash-password"],
        input="\n",
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert empty.returncode == 1
    assert empty.stderr == "error: the password must not be empty\n"
