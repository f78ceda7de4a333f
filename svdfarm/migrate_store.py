"""Moving a farm's job files from one store to another (a shared folder to an S3 bucket).

:func:`migrate_store` copies every stored file of every job in the database to the target
store under the same key, and checks each copy by its size in the target. Keys already in the
target with the source's size are skipped, so a second run (after a failure, or to catch files
written since) copies only what is missing. The jobs' key columns do not change: the keys are
the same in both stores, so the farm moves by pointing ``SVDFARM_STORAGE_URL`` at the target.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from sqlalchemy import select

from svdfarm.db import Database
from svdfarm.models import Job
from svdfarm.storage import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FailedCopy:
    """A key that could not be copied, and why."""

    key: str
    reason: str


@dataclass
class Migration:
    """What one run did (or, dry, would do), by storage key."""

    jobs: int = 0
    #: Keys copied (dry: that would be copied).
    copied: list[str] = field(default_factory=list)
    #: Keys already in the target with the same size.
    skipped: list[str] = field(default_factory=list)
    #: Keys a job row names that the source does not hold (nothing to copy).
    missing: list[str] = field(default_factory=list)
    failed: list[FailedCopy] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, object]:
        """The run as plain data, for ``--json``."""
        return asdict(self)


def job_keys(db: Database, source: Store) -> tuple[int, list[str], list[str]]:
    """``(jobs, stored, missing)``: how many jobs the database holds, the keys the source
    stores under them (a lost claim's outputs included), and the keys their rows name that
    the source does not hold."""
    with db.session() as session:
        rows = session.execute(
            select(Job.id, Job.input_key, Job.video_key, Job.poster_key).order_by(Job.id)
        ).all()
    stored: set[str] = set()
    named: set[str] = set()
    for job_id, *keys in rows:
        stored.update(source.list_keys(f"{job_id}/"))
        named.update(key for key in keys if key)
    # A row may name a key outside its job's folder: copy it too when it is stored.
    for key in named - stored:
        if source.exists(key):
            stored.add(key)
    return len(rows), sorted(stored), sorted(named - stored)


def copy_key(source: Store, target: Store, key: str) -> None:
    """Copy ``key`` from ``source`` to ``target`` and check the target's size; raises
    :class:`OSError` when the sizes differ."""
    path = source.local_path(key)
    if path is not None:
        target.put_file(key, path)  # streamed: a video need not fit in memory
        expected = path.stat().st_size
    else:
        data = source.read_bytes(key)
        target.write_bytes(key, data)
        expected = len(data)
    got = target.size(key)
    if got != expected:
        raise OSError(f"the copy holds {got} bytes, the source {expected}")


def migrate_store(
    db: Database, source: Store, target: Store, *, dry_run: bool = False
) -> Migration:
    """Copy every job's stored files from ``source`` to ``target`` (same keys), skipping keys
    the target already holds with the same size; a failed copy is recorded, not raised, so
    one bad file does not stop the rest."""
    run = Migration(dry_run=dry_run)
    run.jobs, keys, run.missing = job_keys(db, source)
    for key in keys:
        try:
            if target.size(key) == source.size(key):
                run.skipped.append(key)
                continue
            if not dry_run:
                copy_key(source, target, key)
        except Exception as exc:  # any store error: list it and go on with the next key
            log.warning("copying %s failed: %s", key, exc)
            run.failed.append(FailedCopy(key, f"{type(exc).__name__}: {exc}"))
            continue
        run.copied.append(key)
    return run
