"""Moving job files between stores: every job's files reach the target with the same bytes,
a second run copies nothing, a dry run copies nothing, a bad copy is listed and the rest go."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from svdfarm.db import Database
from svdfarm.migrate_store import migrate_store
from svdfarm.settings import Settings
from svdfarm.storage import FileStore, Store, open_store
from tests.conftest import S3Bucket
from tests.rows import add_job, ended_job


def _farm_files(db: Database, settings: Settings) -> list[str]:
    """Two jobs with files in the farm's store, one with a lost claim's video; their keys."""
    done = ended_job(db, settings, timedelta(minutes=5))
    failed = add_job(db, settings)
    open_store(settings).write_bytes(Store.key(failed, "video.lost.mp4"), b"x" * 70_000)
    return sorted(
        [
            Store.key(done, "input.png"),
            Store.key(done, "poster.png"),
            Store.key(done, "video.mp4"),
            Store.key(failed, "input.png"),
            Store.key(failed, "video.lost.mp4"),
        ]
    )


def test_every_file_reaches_the_bucket_once(
    settings: Settings, db: Database, s3_bucket: S3Bucket
) -> None:
    """Dry: listed, nothing copied; then every key with identical bytes; then nothing again."""
    keys = _farm_files(db, settings)
    source = open_store(settings)
    target = open_store(settings.with_overrides(storage_url=s3_bucket.url))

    dry = migrate_store(db, source, target, dry_run=True)
    assert (dry.jobs, dry.copied, dry.failed, dry.dry_run) == (2, keys, [], True)
    assert target.list_keys("") == []

    run = migrate_store(db, source, target)
    assert (run.copied, run.skipped, run.failed, run.missing) == (keys, [], [], [])
    assert target.list_keys("") == keys
    for key in keys:
        assert target.read_bytes(key) == source.read_bytes(key)

    again = migrate_store(db, source, target)
    assert (again.copied, again.skipped, again.failed) == ([], keys, [])


class _Truncating(FileStore):
    """A target that keeps only half of the files whose name contains ``video``."""

    def put_file(self, key: str, path: Path) -> None:
        """Store the file, cut short for a video."""
        data = path.read_bytes()
        self.write_bytes(key, data[: len(data) // 2] if "video" in key else data)


def test_a_bad_copy_is_listed_and_the_rest_go_on(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    """A copy of the wrong size fails with both sizes named; a rerun tries it again."""
    keys = _farm_files(db, settings)
    source, target = open_store(settings), _Truncating(tmp_path / "target")
    run = migrate_store(db, source, target)
    videos = [k for k in keys if "video" in k]
    assert [f.key for f in run.failed] == videos
    assert any("35000 bytes, the source 70000" in f.reason for f in run.failed)
    assert run.copied == [k for k in keys if k not in videos]
    assert [f.key for f in migrate_store(db, source, target).failed] == videos


def test_a_key_named_but_not_stored_is_reported(settings: Settings, db: Database) -> None:
    """A job whose input is gone: nothing to copy, the key is listed as missing."""
    job_id = add_job(db, settings)
    source = open_store(settings)
    source.delete(Store.key(job_id, "input.png"))
    run = migrate_store(db, source, FileStore(settings.data_dir / "elsewhere"))
    assert (run.copied, run.missing, run.failed) == ([], [Store.key(job_id, "input.png")], [])
