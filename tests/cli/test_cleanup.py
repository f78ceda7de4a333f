"""``svdfarm cleanup``: one retention pass by hand, dry or not, as text or JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.settings import load_settings
from svdfarm.states import Actor
from tests.rows import ended_job, stored_names


def test_svdfarm_cleanup_runs_one_pass(cli_env: dict[str, str], tmp_path: Path) -> None:
    """``svdfarm cleanup --dry-run --json`` lists, ``svdfarm cleanup`` deletes."""
    env = {**cli_env, "SVDFARM_RETENTION": "30s"}

    def cleanup(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cli", "cleanup", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    subprocess.run([sys.executable, "-m", "cli", "db", "upgrade"], env=env, check=True, timeout=120)
    settings = load_settings(env)
    db = Database(settings.database_url)
    try:
        job_id = ended_job(db, settings, timedelta(minutes=5))
        dry = json.loads(cleanup("--dry-run", "--json").stdout)
        assert (dry["expired"], dry["dry_run"]) == ([str(job_id)], True)
        assert stored_names(settings, job_id) == ["input.png", "poster.png", "video.mp4"]
        out = cleanup().stdout
        assert "expired outputs of 1 job(s)" in out and f"{job_id}/video.mp4" in out
        assert stored_names(settings, job_id) == ["input.png"]
        with db.session() as session:
            [event] = lifecycle.events_of(session, job_id)
        assert event.actor_kind is Actor.CLI
    finally:
        db.dispose()
