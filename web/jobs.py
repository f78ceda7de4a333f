"""Finding a job from the id in a URL, and describing it for the API and the pages."""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from flask import abort, current_app, url_for
from sqlalchemy import and_, bindparam, or_, select
from sqlalchemy.orm import Session, joinedload

from svdfarm.actions import FP32_DTYPES
from svdfarm.batches import MAX_BATCH_IMAGES
from svdfarm.dispatch import Place, place_of, places_of
from svdfarm.models import Attempt, Batch, Job, JobEvent, Worker, utcnow
from svdfarm.params import OUTPUT_FORMATS
from svdfarm.registry import waiting_reason
from svdfarm.retention import expires_at
from svdfarm.settings import Settings
from svdfarm.states import AttemptOutcome, EventType, JobState, Phase
from svdfarm.storage import preview_step
from web.owners import current_caller, display_names, shown_owner
from web.recent_workers import queue_orders, recent_workers

PHASE_LABELS = {
    Phase.QUEUED: "Waiting in the queue",
    Phase.LOADING: "Loading the model",
    Phase.DENOISING: "Denoising",
    Phase.DECODING: "Decoding frames",
    Phase.ENCODING: "Encoding the MP4",
    Phase.DONE: "Done",
}


#: An absolute path on the server (POSIX, home-relative or Windows) that is not part of a URL:
#: the Hugging Face cache, a model folder. Anonymous visitors read job errors; operators have
#: the whole text on the admin pages.
_SERVER_PATH = re.compile(
    r"(?<![\w.:/\\~-])(?:file://)?(?:~?/|[A-Za-z]:\\)[\w.@+-]+(?:[/\\][\w.@+-]*)*"
)
SERVER_PATH_TEXT = "[a folder on the server]"


def public_text(text: str | None) -> str | None:
    """A job's error or an attempt's message as the public pages and API show it: every server
    path replaced by :data:`SERVER_PATH_TEXT` (a sentence's full stop after a path is kept)."""
    if text is None:
        return None

    def replace(match: re.Match[str]) -> str:
        path = match[0]
        if text[: match.start()].lower().endswith(("url: ", "url ")):
            return path  # a URL's path in an HTTP library's message, not a folder
        stripped = path.rstrip(".")
        return SERVER_PATH_TEXT + path[len(stripped) :]

    return _SERVER_PATH.sub(replace, text)


def repeats_error(message: str | None, error: str | None) -> bool:
    """True when an attempt's ``message`` says what the job's ``error`` already says (the
    worker puts the last attempt's first line into the job's error), so a page shows it once."""
    if not message or not error:
        return False
    first = message.strip().splitlines()[0].strip() if message.strip() else ""
    return bool(first) and first[:500] in error


def public_messages(job: Job) -> dict[int, str]:
    """The attempt messages the public status page shows, by attempt number: without server
    paths, and without the one the job's error (shown above them) already says."""
    shown = {}
    for attempt in job.attempts:
        if attempt.message and not repeats_error(attempt.message, job.error):
            shown[attempt.number] = public_text(attempt.message) or ""
    return shown


def describe_job(
    session: Session, job: Job, *, online: Sequence[Worker] | None = None
) -> dict[str, Any]:
    """:func:`job_json` with the waiting reason and the queued job's place, from the online
    workers as this process read them at most a second ago and its queue's order as read
    since the last job event (:mod:`web.recent_workers`), and the owner as this request's
    caller may read it."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    if online is None:
        online = recent_workers(session, settings)
    return job_json(
        job,
        waiting_reason(session, settings, job, online),
        owner=shown_owner(job.owner),
        place=place_of(session, settings, job, online, queue_orders()),
    )


def describe_jobs(session: Session, jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """:func:`describe_job` of each job, the workers and owners' names read once."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    online = recent_workers(session, settings)
    names = display_names({job.owner for job in jobs}) if current_caller().is_admin else {}
    places = places_of(session, settings, jobs, online, queue_orders())
    return [
        job_json(
            job,
            waiting_reason(session, settings, job, online),
            owner=shown_owner(job.owner, names),
            place=places.get(job.id),
        )
        for job in jobs
    ]


def _no_job(job_id: str) -> NoReturn:
    """The 404 of a job id that names no job (or one the caller may not see: the same)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        abort(404, description=f"No job with id {job_id[:64]!r}: job ids are UUIDs.")
    abort(404, description=f"No job with id {job_id}.")


#: A job by id with its attempts in the same query (every caller shows them), built once: a
#: prepared statement costs less per read than ``Session.get`` with its options.
_JOB_BY_ID = select(Job).options(joinedload(Job.attempts)).where(Job.id == bindparam("job_id"))


def find_job(session: Session, job_id: str) -> Job:
    """The job with this id, or a 404 that says so (whoever owns it: the admin's pages)."""
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        _no_job(job_id)
    job = session.execute(_JOB_BY_ID, {"job_id": key}).unique().scalar_one_or_none()
    if job is None:
        _no_job(job_id)
    return job


def own_job(session: Session, job_id: str) -> Job:
    """The job with this id when this request's caller may see it; otherwise the very 404 of
    an unknown id (:mod:`web.owners`)."""
    job = find_job(session, job_id)
    if not current_caller().may_see(job.owner):
        _no_job(job_id)
    return job


def find_batch(session: Session, batch_id: str) -> Batch:
    """The batch with this id, or a 404 that says so."""
    try:
        key = uuid.UUID(batch_id)
    except ValueError:
        abort(404, description=f"No batch with id {batch_id[:64]!r}: batch ids are UUIDs.")
    batch = session.get(Batch, key)
    if batch is None:
        abort(404, description=f"No batch with id {batch_id}.")
    return batch


def own_batch(session: Session, batch_id: str) -> Batch:
    """The batch with this id when this request's caller may see its jobs (all of a batch's
    jobs have one owner); otherwise the very 404 of an unknown id."""
    batch = find_batch(session, batch_id)
    caller = current_caller()
    if not batch.jobs or not all(caller.may_see(job.owner) for job in batch.jobs):
        abort(404, description=f"No batch with id {batch_id}.")
    return batch


#: The jobs one page of a listing has at most, and by default.
MAX_PAGE, DEFAULT_PAGE = 100, 20


class CursorError(ValueError):
    """A listing's cursor that is not one this farm made."""


def encode_cursor(job: Job) -> str:
    """The opaque cursor after ``job`` in a newest-first listing: its creation time and id."""
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The creation time and id a cursor of :func:`encode_cursor` holds; CursorError else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, job_id = raw.partition("|")
        found = datetime.fromisoformat(moment), uuid.UUID(job_id)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise CursorError(
            "The cursor is not one this farm gave: pass next_cursor as it came."
        ) from exc
    if found[0].tzinfo is None:
        raise CursorError("The cursor is not one this farm gave: pass next_cursor as it came.")
    return found


def jobs_page(
    session: Session,
    owners: Collection[str],
    *,
    limit: int = DEFAULT_PAGE,
    cursor: str | None = None,
    state: JobState | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the jobs of ``owners``, newest first by (created_at, id), after ``cursor``
    (keyset pagination), in ``state`` when given; and the cursor of the next page (None on
    the last). Raises CursorError for a cursor this farm did not make."""
    query = select(Job).where(Job.owner.in_(list(owners)))
    if state is not None:
        query = query.where(Job.state == state)
    if cursor:
        created, job_id = decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list(session.scalars(query.options(joinedload(Job.attempts))).unique())
    if len(jobs) > limit:
        return jobs[:limit], encode_cursor(jobs[limit - 1])
    return jobs, None


def batch_body_limit(settings: Settings) -> int:
    """The largest body a batch may send: its most images, each within the upload limit."""
    from web import FORM_OVERHEAD_BYTES

    return settings.max_upload_bytes * MAX_BATCH_IMAGES + FORM_OVERHEAD_BYTES


def batch_json(session: Session, batch: Batch) -> dict[str, Any]:
    """A batch as ``GET /api/v1/batches/<id>`` answers it: its jobs in order (each as
    :func:`job_json`), how many are in each state, the overall progress, whether every job
    has ended, and the zip of the outputs made so far."""
    jobs = describe_jobs(session, batch.jobs)
    counts: dict[str, int] = {}
    for job in batch.jobs:
        counts[job.state.value] = counts.get(job.state.value, 0) + 1
    ended = all(job.state.terminal for job in batch.jobs)
    progress = sum(1.0 if j.state.terminal else j.progress for j in batch.jobs)
    return {
        "id": str(batch.id),
        "created_at": _iso(batch.created_at),
        "done": ended,
        "progress": round(progress / max(1, len(batch.jobs)), 4),
        "counts": counts,
        "jobs": jobs,
        "outputs_url": url_for("pages.batch_outputs", batch_id=batch.id, _external=True),
        "status_url": url_for("api.get_batch", batch_id=batch.id, _external=True),
        "page_url": url_for("pages.batch", batch_id=batch.id, _external=True),
    }


def _iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601, or None."""
    return value.isoformat() if value else None


def attempt_json(attempt: Attempt) -> dict[str, Any]:
    """One attempt as the public API shows it (no traceback: that is for the admin)."""
    return {
        "number": attempt.number,
        "worker": attempt.worker,
        "plan_name": attempt.plan_name,
        "plan": attempt.plan,
        "outcome": attempt.outcome.value,
        "error_class": attempt.error_class.value if attempt.error_class else None,
        "error_type": attempt.error_type,
        "message": public_text(attempt.message),
        "started_at": _iso(attempt.started_at),
        "finished_at": _iso(attempt.finished_at),
        "duration_s": attempt.duration_s,
        "peak_memory_bytes": attempt.peak_memory_bytes,
    }


def _duration(seconds: float) -> str:
    """A duration as a person reads it: "8.2 s", "3 min 05 s", "1 h 02 min"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def phase_text(job: Job) -> str:
    """The job's phase as a person reads it, with the step while denoising."""
    if job.state is JobState.CANCEL_REQUESTED:
        return "Canceling: the worker stops at its next step"
    if job.state is JobState.CANCELED:
        return "Canceled: no video was made"
    if job.state is JobState.FAILED:
        return "Stopped with an error"
    if job.state is JobState.SUCCEEDED and job.started_at and job.finished_at:
        seconds = (job.finished_at - job.started_at).total_seconds()
        return f"Done in {_duration(seconds)}"
    label = PHASE_LABELS[job.phase]
    if job.phase is Phase.DENOISING:
        label += f" (step {job.step}/{job.num_inference_steps})"
    return label


def _running_since(job: Job) -> datetime | None:
    """When the attempt now running started (the job's start when no attempt row exists yet)."""
    running = [a for a in job.attempts if a.outcome is AttemptOutcome.RUNNING]
    return running[-1].started_at if running else job.started_at


#: A step "takes long" once it has run this many times the average step before it, and at
#: least :data:`STEP_OVERRUN_MIN_S`: the page then says how long it has run, not a time left.
STEP_OVERRUN_FACTOR = 3.0
STEP_OVERRUN_MIN_S = 10.0


@dataclass(frozen=True)
class Pace:
    """A running job's pace as measured at its last progress write.

    ``left_s``: the time left then, counted down since (so it never grows while a step runs);
    ``waited_s``: seconds since that write, i.e. how long the current step has run;
    ``step_s``: the average time per step up to the write.
    """

    left_s: float
    waited_s: float
    step_s: float

    @property
    def overrun(self) -> bool:
        """True when the current step has run far longer than the steps before it."""
        return self.waited_s >= max(STEP_OVERRUN_MIN_S, STEP_OVERRUN_FACTOR * self.step_s)


def pace(job: Job, now: datetime | None = None) -> Pace | None:
    """The running job's :class:`Pace`, or None while nothing has been measured.

    Simple and honest: the time from the current attempt's start to the last progress write,
    divided by the progress made then, times the progress left; minus the time since that
    write. The worker's progress shares already give decoding and encoding their slice of the
    bar, so that is the allowance for them. Nothing is measured before one denoising step is
    done, and because the model load counts as measured time it errs long on a worker's first
    job, less so as the render goes on.
    """
    if job.state is not JobState.RUNNING or not job.phase.rendering:
        return None
    if job.phase is Phase.DENOISING and job.step < 1:
        return None
    since = _running_since(job)
    if since is None or job.progress <= 0:
        return None
    measured_at = max(job.updated_at or since, since)
    measured = (measured_at - since).total_seconds()
    if measured <= 0:
        return None
    progress = min(job.progress, 1.0)
    waited = max(0.0, ((now or utcnow()) - measured_at).total_seconds())
    left = measured / progress * (1.0 - progress) - waited
    return Pace(left_s=max(0.0, left), waited_s=waited, step_s=measured / max(job.step, 1))


def eta_seconds(job: Job, now: datetime | None = None) -> float | None:
    """Seconds the running job probably still needs (:func:`pace`), or None when nothing is
    measured yet or the current step has overrun (:func:`eta_for` then says how long it ran)."""
    found = pace(job, now)
    return None if found is None or found.overrun else found.left_s


def eta_text(seconds: float | None) -> str | None:
    """An ETA as a person reads it: "about 3 min left", "a few seconds left"."""
    if seconds is None:
        return None
    if seconds < 10:
        return "a few seconds left"
    if seconds < 90:
        return f"about {int(round(seconds / 5.0)) * 5} s left"
    if seconds < 90 * 60:
        return f"about {int(round(seconds / 60.0))} min left"
    return f"about {seconds / 3600.0:.1f} h left"


def eta_for(job: Job, now: datetime | None = None) -> str | None:
    """What the status page says about the time left: :func:`eta_text`, or once a step has
    overrun, which step is running and for how long ("Step 7 of 12 running for 40 s")."""
    found = pace(job, now)
    if found is None:
        return None
    if not found.overrun:
        return eta_text(found.left_s)
    ran = found.waited_s
    return overrun_prefix(job) + (f"{int(ran)} s" if ran < 60 else _duration(ran))


def overrun_prefix(job: Job) -> str:
    """What the page says of a running step that overruns, before the time it has run:
    "Step 7 of 12 running for ", or "Decoding: running for "."""
    if job.phase is Phase.DENOISING:
        total = job.num_inference_steps
        return f"Step {min(job.step + 1, total)} of {total} running for "
    return f"{PHASE_LABELS[job.phase]}: running for "


def output_urls(job: Job) -> dict[str, str]:
    """The URL of each output format a job made (``{"mp4": ..., "webm": ...}``), mp4 first."""
    urls = {"mp4": url_for("pages.video", job_id=job.id, _external=True)}
    for output in OUTPUT_FORMATS:
        if output != "mp4" and output in (job.output_keys or {}):
            urls[output] = url_for("pages.output", job_id=job.id, output=output, _external=True)
    return urls


def preview_url(job: Job) -> str | None:
    """The URL of a running job's latest preview (``?step=N``, the step it shows, so a new
    one is a new URL), or None: not running, no preview yet, or one of a lost claim."""
    step = preview_step(job.preview_key, job.claim_token) if job.state.active else None
    if step is None:
        return None
    return url_for("pages.preview", job_id=job.id, step=step, _external=True)


def place_json(place: Place | None) -> dict[str, Any] | None:
    """A queued job's place as the API shows it (None for a job that is not queued)."""
    if place is None:
        return None
    return {
        "position": place.position,
        "eta_seconds": round(place.eta_s, 1) if place.eta_s is not None else None,
        "held": place.held,
    }


def place_text(place: dict[str, Any] | None) -> str:
    """The status page's sentence of a queued job's place: "3rd in line, starts in about
    4 min.", with the reason it is held back when there is one."""
    if place is None:
        return ""
    eta = place["eta_seconds"]
    text = Place(place["position"], eta, place["held"]).describe()
    text = text[:1].upper() + text[1:] + "."
    if place["held"]:
        held = place["held"]
        text += f" Held back: {held[:1].upper()}{held[1:]}."
    return text


def job_json(
    job: Job,
    waiting: str | None = None,
    *,
    owner: str = "anonymous",
    place: Place | None = None,
) -> dict[str, Any]:
    """The job as ``GET /api/v1/jobs/<id>`` answers it (``waiting``: why a queued job waits;
    ``owner``: its owner as the caller may read it; ``place``: a queued job's place).

    ``phase_text`` is the waiting reason while there is one, else ``phase_label`` (the phase as a
    person reads it); ``eta_s`` comes from :func:`eta_seconds`, ``eta_text`` from
    :func:`eta_for`. ``error`` and the attempts' messages carry no server paths
    (:func:`public_text`): the admin pages have the whole text. ``expires_at`` is when
    retention deletes the outputs (None: kept forever); once it has, ``expired`` is true and
    there is no video or poster URL. ``outputs`` has the URL of each output format once the
    job succeeded (empty before, and once expired). ``preview_url`` is a running job's latest
    preview (:func:`preview_url`).
    """
    settings = current_app.config["SVDFARM_SETTINGS"]
    expired = job.expired_at is not None
    done = job.state is JobState.SUCCEEDED and job.video_key and not expired
    now = utcnow()
    eta = eta_seconds(job, now)
    return {
        "id": str(job.id),
        "state": job.state.value,
        "phase": job.phase.value,
        "phase_text": waiting or phase_text(job),
        "phase_label": phase_text(job),
        "waiting": waiting,
        "queue": job.queue,
        "memory_estimate_bytes": job.memory_estimate_bytes,
        "progress": round(job.progress, 4),
        "step": job.step,
        "eta_s": round(eta, 1) if eta is not None else None,
        "eta_text": eta_for(job, now),
        "model": job.model,
        "owner": owner,
        "priority": job.priority,
        "place": place_json(place) if job.state is JobState.QUEUED else None,
        "params": job.params(),
        "input_filename": job.input_filename,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "expires_at": None if expired else _iso(expires_at(job, settings)),
        "expired": expired,
        "expired_at": _iso(job.expired_at),
        "attempts": [attempt_json(a) for a in job.attempts],
        "video_url": url_for("pages.video", job_id=job.id, _external=True) if done else None,
        "poster_url": (
            url_for("pages.poster", job_id=job.id, _external=True)
            if job.poster_key and not expired
            else None
        ),
        "outputs": output_urls(job) if done else {},
        "preview_url": preview_url(job),
        "error": public_text(job.error),
        "status_url": url_for("api.get_job", job_id=job.id, _external=True),
        "page_url": url_for("pages.job", job_id=job.id, _external=True),
    }


def override_text(dtypes: dict[str, str] | None, casts: bool | None) -> str:
    """An operator's overrides of a job as a person reads them ("fp32 for every component,
    boundary casts off"); empty when there are none. The job's precision stays as asked."""
    parts = []
    if dtypes:
        kinds = set(dtypes.values())
        if len(kinds) == 1 and set(dtypes) >= set(FP32_DTYPES):
            parts.append(f"{kinds.pop()} for every component")
        else:
            parts.append(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in dtypes.items()))
    if casts is not None:
        parts.append(f"boundary casts {'on' if casts else 'off'}")
    return ", ".join(parts)


def event_text(event: JobEvent) -> str:
    """One event of a job's timeline as a person reads it (no server detail)."""
    d = event.details or {}
    kind = event.type
    if kind is EventType.SUBMITTED:
        return f"Submitted to {d.get('queue') or 'the queue'}"
    if kind is EventType.PUBLISHED:
        return f"Put on {d.get('queue') or 'its queue'}"
    if kind is EventType.PUBLISH_FAILED:
        return "The queue could not be reached; it is sent again once it can"
    if kind is EventType.CLAIMED:
        plan = f" with plan {d['plan']}" if d.get("plan") else ""
        return f"Taken by {d.get('worker') or event.actor}{plan}"
    if kind is EventType.PHASE:
        try:
            return PHASE_LABELS[Phase(d.get("phase"))]
        except ValueError:
            return "Next phase"
    if kind is EventType.ATTEMPT_FAILED:
        why = str(d.get("error_class") or "an error").replace("_", " ")
        return f"Attempt {d.get('attempt', '')} failed ({why})".replace("  ", " ")
    if kind is EventType.SUCCEEDED:
        return "Video stored"
    if kind is EventType.FAILED:
        if d.get("reason") == "poison":
            return f"Failed: its worker was lost {d.get('lost_in_a_row')} times in a row"
        if d.get("error_class") == "storage":
            return "Failed: the video could not be stored"
        if d.get("reason") == "max_wait":
            return "Failed: no worker that can run it came online in time"
        return "Failed"
    if kind is EventType.CANCEL_REQUESTED:
        return "Cancel requested"
    if kind is EventType.CANCELED:
        return "Canceled" + (f": {d['reason']}" if d.get("reason") else "")
    if kind is EventType.REQUEUED:
        overrides = d.get("overrides") or {}
        changed = override_text(overrides.get("dtypes"), overrides.get("casts"))
        if overrides.get("queue"):
            changed = ", ".join(filter(None, [changed, f"on {overrides['queue']}"]))
        return "Queued again" + (f" ({changed})" if changed else "")
    if kind is EventType.WORKER_LOST:
        return f"Worker {d.get('worker') or ''} lost; back in the queue".replace("  ", " ")
    if kind is EventType.EXPIRED:
        what = [w for w, on in (("outputs", d.get("outputs")), ("input", d.get("input"))) if on]
        return f"Expired: {' and '.join(what) or 'files'} deleted by retention"
    if kind is EventType.STORAGE_RETRIED:
        return "Queued again after its video could not be stored"
    if kind is EventType.PRIORITY_CHANGED:
        if d.get("front"):
            return "Moved to the front of the line"
        return f"Priority changed from {d.get('from')} to {d.get('to')}"
    if kind is EventType.DECLINED:
        return "Left for another worker (this one failed it before)"
    if d.get("after_failure"):
        return "Handed back to the queue for another worker after an attempt failed"
    return "Handed back to the queue by a stopping worker"
