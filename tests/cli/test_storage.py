"""``svdfarm storage migrate``: a farm's files copied from its folder to a bucket, then nothing
on a second run; a bad URL exits 2 naming it, a failed copy exits 1 listing the keys."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

from svdfarm.db import Database
from svdfarm.settings import load_settings
from svdfarm.storage import open_store
from tests.conftest import S3Bucket
from tests.rows import ended_job


def _svdfarm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``svdfarm <args>`` with ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_svdfarm_storage_migrate(cli_env: dict[str, str], s3_bucket: S3Bucket) -> None:
    """Dry run lists, a run copies with identical bytes and says what to set, a rerun skips."""
    env = {**cli_env, **s3_bucket.env}
    assert _svdfarm(env, "db", "upgrade").returncode == 0
    settings = load_settings(env)
    db = Database(settings.database_url)
    try:
        job_id = ended_job(db, settings, timedelta(minutes=5))
    finally:
        db.dispose()
    source = open_store(settings)
    target = open_store(settings.with_overrides(storage_url=s3_bucket.url))
    keys = source.list_keys(f"{job_id}/")
    assert len(keys) == 3

    dry = json.loads(
        _svdfarm(env, "storage", "migrate", "--to", s3_bucket.url, "--dry-run", "--json").stdout
    )
    assert (dry["copied"], dry["dry_run"], dry["target"]) == (keys, True, s3_bucket.url)
    assert target.list_keys("") == []

    done = _svdfarm(env, "storage", "migrate", "--to", s3_bucket.url)
    assert done.returncode == 0, done.stderr
    assert "copied 3 file(s) of 1 job(s)" in done.stdout
    assert f"SVDFARM_STORAGE_URL={s3_bucket.url}" in done.stdout
    assert [target.read_bytes(k) for k in keys] == [source.read_bytes(k) for k in keys]

    again = json.loads(_svdfarm(env, "storage", "migrate", "--to", s3_bucket.url, "--json").stdout)
    assert (again["copied"], again["skipped"]) == ([], keys)

    nowhere = _svdfarm(env, "storage", "migrate", "--to", "s3://svdfarm-no-such-bucket/farm")
    assert nowhere.returncode == 1
    assert "3 file(s) were not copied" in nowhere.stderr and keys[0] in nowhere.stderr


def test_a_bad_target_url_exits_2_naming_it(cli_env: dict[str, str]) -> None:
    """A URL that is no store, or the store in use, is refused before anything is read."""
    bad = _svdfarm(cli_env, "storage", "migrate", "--to", "ftp://host/farm")
    assert bad.returncode == 2
    assert "--to='ftp://host/farm' is not usable" in bad.stderr
    same = f"file://{cli_env['SVDFARM_DATA_DIR']}/jobs"
    assert _svdfarm(cli_env, "storage", "migrate", "--to", same).returncode == 2
