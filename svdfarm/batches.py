"""Batches: one submit of several images and seeds, one job per image and seed, every job
sharing the same settings.

A batch is validated whole before anything is written (every image, every field, the seeds),
counts as its jobs against the per-client and farm-wide limits, and is recorded in one
transaction: its row, its jobs and their stored inputs, or nothing. The jobs' ids go on
their queues after the commit, as one submission's would (:func:`svdfarm.jobs.publish`).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from svdfarm import lifecycle
from svdfarm.jobs import (
    Submission,
    check_limits,
    check_owner,
    dispatch_after_submit,
    new_job,
    validate_submission,
)
from svdfarm.lifecycle import By
from svdfarm.models import Batch, Job
from svdfarm.params import MAX_SEED, ParamError
from svdfarm.registry import online_queues
from svdfarm.settings import Settings
from svdfarm.storage import open_store
from svdfarm.users import user_id_of

#: The fields a batch takes besides a submission's: the seeds, or how many per image.
BATCH_FIELDS = ("seeds", "count")
#: The most jobs (images x seeds) one batch may make, and the most images it may carry.
MAX_BATCH_JOBS = 64
MAX_BATCH_IMAGES = 16


@dataclass(frozen=True)
class Upload:
    """One image part of a batch: its bytes and the client's file name."""

    data: bytes
    filename: str


def _whole(text: str) -> bool:
    """True for ASCII digits only (``"²".isdigit()`` is true, and ``int("²")`` fails)."""
    return text.isascii() and text.isdigit()


def parse_seeds(fields: Mapping[str, Any], rng: random.Random | None = None) -> list[int | None]:
    """The seeds each image is rendered with: ``seeds`` (comma-separated whole numbers), or
    ``count`` of them (from the ``seed`` field upwards, else drawn at random), or one (the
    ``seed`` field's, or random: None). Raises ParamError naming the field."""
    seeds_text = str(fields.get("seeds") or "").strip()
    count_text = str(fields.get("count") or "").strip()
    if seeds_text and count_text:
        raise ParamError({"seeds": "Send seeds or count, not both."})
    if seeds_text and str(fields.get("seed") or "").strip():
        raise ParamError({"seeds": "Send seeds or seed, not both."})
    if seeds_text:
        seeds: list[int | None] = []
        for part in seeds_text.split(","):
            text = part.strip(" ")
            if not _whole(text) or int(text) > MAX_SEED:
                raise ParamError(
                    {
                        "seeds": "Seeds must be whole numbers from 0 to "
                        f"{MAX_SEED}, comma-separated; got {text[:40]!r}."
                    }
                )
            seeds.append(int(text))
        if len(seeds) > MAX_BATCH_JOBS:
            raise ParamError(
                {"seeds": f"At most {MAX_BATCH_JOBS} seeds in one batch; {len(seeds)} were sent."}
            )
        return seeds
    if count_text:
        if not _whole(count_text) or not 1 <= int(count_text) <= MAX_BATCH_JOBS:
            raise ParamError(
                {
                    "count": f"Count must be a whole number from 1 to {MAX_BATCH_JOBS}, "
                    f"got {count_text[:40]!r}."
                }
            )
        count = int(count_text)
        first = str(fields.get("seed") or "").strip()
        if _whole(first) and int(first) + count - 1 <= MAX_SEED:
            return [int(first) + i for i in range(count)]
        draw = rng or random.SystemRandom()
        return [draw.randrange(0, 2**32) for _ in range(count)]
    return [None]


def validate_batch(
    settings: Settings, fields: Mapping[str, Any], uploads: Sequence[Upload]
) -> list[Submission]:
    """Every job of the batch, image by image and, for each, seed by seed; raises ParamError
    with every problem at once (an image's problem names it: ``image 2 (cat.png)``)."""
    errors: dict[str, str] = {}
    status = 400
    if not uploads:
        errors["image"] = "Choose one or more images to animate (PNG, JPEG or WebP)."
    elif len(uploads) > MAX_BATCH_IMAGES:
        errors["image"] = (
            f"At most {MAX_BATCH_IMAGES} images in one batch; {len(uploads)} were sent."
        )
    try:
        seeds = parse_seeds(fields)
    except ParamError as exc:
        errors.update(exc.errors)
        seeds = [None]
    total = len(uploads) * len(seeds)
    if total > MAX_BATCH_JOBS and "image" not in errors:
        errors["seeds" if len(seeds) > 1 else "image"] = (
            f"A batch makes at most {MAX_BATCH_JOBS} jobs; {len(uploads)} images x "
            f"{len(seeds)} seeds make {total}."
        )
    if errors:
        raise ParamError(errors, status)
    job_fields = {k: v for k, v in fields.items() if k not in BATCH_FIELDS}
    submissions: list[Submission] = []
    for number, upload in enumerate(uploads, start=1):
        try:
            first = validate_submission(settings, job_fields, upload.data, upload.filename)
        except ParamError as exc:
            for name, message in exc.errors.items():
                if name == "image":
                    shown = f" ({upload.filename[:60]})" if upload.filename else ""
                    errors[f"image {number}"] = f"Image {number}{shown}: {message}"
                    status = exc.status if status == 400 else status
                else:
                    errors.setdefault(name, message)
            continue
        for seed in seeds:
            # No seeds nor count: the image's one job, with the seed field's seed or a random one.
            params = first.params if seed is None else replace(first.params, seed=seed)
            submissions.append(replace(first, params=params))
    if errors:
        raise ParamError(errors, status)
    return submissions


def submit_batch(
    session: Session,
    celery: Celery,
    settings: Settings,
    submissions: Sequence[Submission],
    *,
    client: str | None = None,
    by: By,
    owner: str,
) -> tuple[Batch, list[Job]]:
    """Record the batch and all its jobs in one transaction, store their inputs, commit, then
    put each job's id on its queue. Raises :class:`svdfarm.jobs.SubmitRefused` when the
    batch's jobs would pass a limit, ParamError when its owner may not ask its priority
    (nothing is written then)."""
    check_owner(session, owner, submissions, count=len(submissions))
    rated = client if user_id_of(owner) is None else None  # users have limits of their own
    check_limits(session, settings, rated, count=len(submissions))
    storage = open_store(settings)
    batch = Batch(id=uuid.uuid4(), client=(client or None) and client[:64])
    session.add(batch)
    online = online_queues(session, settings)
    jobs: list[Job] = []
    try:
        session.flush()
        for index, submission in enumerate(submissions):
            job = new_job(settings, submission, client=client, online=online, owner=owner)
            job.batch_id, job.batch_index = batch.id, index
            lifecycle.submit(session, job, by=by)
            storage.write_bytes(job.input_key, submission.data)
            jobs.append(job)
        session.commit()
    except BaseException:
        session.rollback()
        for job in jobs:
            storage.delete_job(job.id)
        raise
    dispatch_after_submit(session, celery, settings, {job.queue for job in jobs})
    return batch, jobs
