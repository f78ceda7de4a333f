"""Running one job from its id: claim it in the database, record the attempt, render, store.

Every state change is a move of :mod:`svdfarm.lifecycle` (conditional, with its event), so a
redelivered or canceled job is never rendered twice or overwritten once it has finished.
Each claim takes a fresh token; the video is rendered in a local temporary folder, put in
the store under the claim's own names (``video.<token>.mp4``), and the transaction that marks
the job succeeded, only while the token is still the job's, points the job's row at them. A
worker whose job was taken over (it was thought lost) deletes its output; the winner deletes
any a lost claim left. Status writes are retried while
the database is unreachable (``SVDFARM_DB_RETRY_TIMEOUT``), so a restart of PostgreSQL does
not lose a finished video.
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from svdfarm import lifecycle, worker_health
from svdfarm.catalog import queue_key
from svdfarm.db import Database, is_unavailable, retrying
from svdfarm.images import open_upright_rgb
from svdfarm.lifecycle import By
from svdfarm.models import Attempt, Job, Worker, utcnow
from svdfarm.params import RenderParams
from svdfarm.settings import Settings
from svdfarm.states import (
    Actor,
    AttemptOutcome,
    ClaimOutcome,
    ErrorClass,
    JobState,
    Phase,
    RunOutcome,
    WorkerState,
)
from svdfarm.storage import Store, open_store, other_claims_outputs, output_keys, output_name
from worker.errors import JobCanceled, classify, user_message
from worker.planner import first_plan
from worker.plans import Plan
from worker.previews import PreviewWriter
from worker.runner import AttemptResult, RenderFailed, local_capabilities, render_with_ladder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    """What a worker needs of a job it has claimed."""

    params: RenderParams
    input_key: str
    plan: Plan
    reason: str | None
    token: str
    #: The model the job was submitted for (empty for a job recorded without one).
    model: str = ""


def _params_of(job: Job) -> RenderParams:
    """The job's render parameters."""
    return RenderParams(**job.params())


def _claim(
    db: Database, settings: Settings, job_id: uuid.UUID, hostname: str
) -> Claimed | ClaimOutcome:
    """Mark the job running under a new token and choose its first plan; or say why not."""
    by = By(Actor.WORKER, hostname)
    with db.begin() as session:
        # A job that failed here goes to another worker when one is free (or any job, when
        # this worker is flagged): declined, it waits for the dispatcher again.
        why = worker_health.decline_reason(session, settings, job_id, hostname)
        if why is not None and lifecycle.decline(session, job_id, by=by, reason=why):
            log.warning("job %s declined: %s", job_id, why)
            return ClaimOutcome.DECLINED
        chosen: list[tuple[Plan, str | None]] = []

        def plan_of(job: Job) -> dict[str, Any]:
            """The first plan, chosen from the locked job: named in its ``claimed`` event."""
            casts = settings.casts if job.casts is None else job.casts
            chosen.append(
                first_plan(local_capabilities(), _params_of(job), casts=casts, dtypes=job.dtypes)
            )
            return {"plan": chosen[-1][0].name}

        taken = lifecycle.claim(session, settings, job_id, by=by, more_details=plan_of)
        if taken.outcome is not ClaimOutcome.CLAIMED:
            return taken.outcome
        job = taken.job
        assert job is not None and chosen
        params = _params_of(job)
        plan, reason = chosen[-1]
        # This worker holds the job now, and is busy unless it was draining (one write).
        session.execute(
            update(Worker)
            .where(Worker.hostname == hostname)
            .values(
                current_job_id=job_id,
                last_heartbeat=utcnow(),
                state=case(
                    (Worker.state == WorkerState.IDLE, WorkerState.BUSY), else_=Worker.state
                ),
            )
        )
        return Claimed(params, job.input_key, plan, reason, taken.token, job.model or "")


class _ProgressWriter:
    """Writes phase and progress to the job row, throttled; stops the render on cancel."""

    def __init__(self, db: Database, job_id: uuid.UUID, interval_s: float, by: By) -> None:
        """Write for ``job_id`` at most every ``interval_s`` seconds (phase changes at once)."""
        self.db, self.job_id, self.interval_s, self.by = db, job_id, interval_s, by
        self.last_write = 0.0
        self.last_phase: Phase | None = None

    def __call__(self, phase: Phase, progress: float, step: int) -> None:
        """Record progress; raise :class:`JobCanceled` when a cancel was requested."""
        now = time.monotonic()
        if phase == self.last_phase and now - self.last_write < self.interval_s:
            return
        self.last_write, self.last_phase = now, phase
        try:
            with self.db.begin() as session:
                state = lifecycle.progress(
                    session, self.job_id, by=self.by, phase=phase, fraction=progress, step=step
                )
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            # Progress is advisory: the render goes on; the heartbeat keeps the job ours.
            log.warning("progress of job %s not written: database unavailable", self.job_id)
            return
        if state is JobState.CANCEL_REQUESTED:
            raise JobCanceled()


class _AttemptRows:
    """Records each attempt of the ladder as a row, as it starts and as it ends; a failed one
    is also an ``attempt_failed`` event of the job, while this claim holds it."""

    def __init__(
        self, db: Database, job_id: uuid.UUID, hostname: str, *, token: str, retry_timeout_s: float
    ) -> None:
        """Record attempts of ``job_id`` run by ``hostname`` under the claim ``token``,
        retrying for ``retry_timeout_s`` while the database is unreachable."""
        self.db, self.job_id, self.hostname, self.token = db, job_id, hostname, token
        self.retry_timeout_s = retry_timeout_s
        self.rows: dict[int, int] = {}  # attempt number in this run -> row id

    def started(self, attempt: AttemptResult) -> None:
        """Insert the attempt's row, numbered after any earlier runs of the job."""
        retrying(
            lambda: self._started(attempt),
            timeout_s=self.retry_timeout_s,
            what=f"job {self.job_id}: recording attempt {attempt.number}",
        )

    def _started(self, attempt: AttemptResult) -> None:
        """One try at inserting the attempt's row."""
        with self.db.begin() as session:
            # Numbered after the job's earlier attempts in the INSERT itself: one round trip
            # (it is on the idle farm's path from submit to render), not a read and an insert.
            number = (
                select(func.coalesce(func.max(Attempt.number), 0) + 1)
                .where(Attempt.job_id == self.job_id)
                .scalar_subquery()
            )
            plan = attempt.plan.as_dict()
            if attempt.reason:
                plan["reason"] = attempt.reason
            row = Attempt(
                job_id=self.job_id,
                number=number,
                worker=self.hostname,
                plan_name=attempt.plan.name,
                plan=plan,
                outcome=AttemptOutcome.RUNNING,
            )
            session.add(row)
            session.flush()
            self.rows[attempt.number] = row.id

    def finished(self, attempt: AttemptResult) -> None:
        """Write how the attempt ended."""
        retrying(
            lambda: self._finished(attempt),
            timeout_s=self.retry_timeout_s,
            what=f"job {self.job_id}: recording how attempt {attempt.number} ended",
        )

    def _finished(self, attempt: AttemptResult) -> None:
        """One try at writing how the attempt ended."""
        with self.db.begin() as session:
            row = session.get(Attempt, self.rows[attempt.number])
            if row is None or row.outcome is not AttemptOutcome.RUNNING:
                return  # the reaper closed it: this worker was taken for lost
            row.finished_at = utcnow()
            row.outcome = attempt.outcome
            row.error_class = attempt.error_class
            row.error_type = attempt.error_type
            row.message = attempt.message
            row.traceback = attempt.traceback
            row.duration_s = attempt.duration_s
            row.peak_memory_bytes = attempt.peak_memory_bytes
            if attempt.outcome is AttemptOutcome.FAILED:
                details = {
                    "attempt": row.number,
                    "plan": row.plan_name,
                    "error_class": attempt.error_class.value if attempt.error_class else None,
                    "component": attempt.component,
                }
                by = By(Actor.WORKER, self.hostname)
                lifecycle.attempt_failed(
                    session, self.job_id, by=by, token=self.token, details=details
                )


@dataclass(frozen=True)
class _End:
    """How a run ends: the outcome, with the error or the video's columns."""

    outcome: RunOutcome
    error: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


def _finish(
    db: Database,
    settings: Settings,
    claimed: Claimed,
    *,
    job_id: uuid.UUID,
    hostname: str,
    end: _End,
    store: Store | None = None,
    outputs: tuple[str, ...] = (),
    previews: PreviewWriter | None = None,
) -> bool:
    """Move the job to its end state and free the worker, in one transaction.

    Only while ``claimed.token`` is still the job's. ``outputs`` are the keys this claim put
    in ``store`` (named with its token; ``end.values`` points the row at them): the commit
    makes them the job's, so a succeeded job's files are never replaced and a job taken over
    elsewhere gets none of this worker's. Retried while the database is unreachable. Returns
    False (this claim's outputs deleted) when the job was not ours; a success deletes the
    outputs of the job's lost claims, a failure its own. This claim's ``previews`` go in
    any case (with a success, every claim's).
    """
    loaded = loaded_model_key(settings, claimed.model)
    won = retrying(
        lambda: _finish_once(db, claimed.token, job_id, hostname, end, loaded),
        timeout_s=settings.db_retry_timeout_s,
        what=f"job {job_id}: recording how it ended",
    )
    if previews is not None:
        previews.discard(every_claim=won and end.outcome is RunOutcome.SUCCEEDED)
    if store is None:
        return won
    if not won:
        log.warning("job %s was taken over by another worker; this run's output is dropped", job_id)
    # Kept: the outputs of a success that was ours; dropped: those of a lost claim (ours, or
    # when we won, another's) and whatever a failure left half stored.
    swept = list(outputs)
    if won and end.outcome is RunOutcome.SUCCEEDED:
        swept = other_claims_outputs(store, job_id, claimed.token)
    for key in swept:
        try:
            store.delete(key)
        except Exception:  # the job is recorded; a leftover goes with the job's deletion
            log.warning("job %s: could not delete %s from the store", job_id, key, exc_info=True)
    return won


def _finish_once(
    db: Database,
    token: str,
    job_id: uuid.UUID,
    hostname: str,
    end: _End,
    loaded: str | None = None,
) -> bool:
    """One try at :func:`_finish` (``loaded``: the model this process holds loaded now)."""
    now = utcnow()
    by = By(Actor.WORKER, hostname)
    with db.begin() as session:
        if end.outcome is RunOutcome.SUCCEEDED:
            won = lifecycle.succeed(
                session, job_id, by=by, token=token, values=end.values, details=end.details
            )
        elif end.outcome is RunOutcome.FAILED:
            won = lifecycle.fail(
                session, job_id, by=by, token=token, error=end.error, details=end.details
            )
        else:
            won = lifecycle.confirm_cancel(session, job_id, by=by, token=token)
        _free_worker(session, hostname, job_id, now, loaded=loaded)
    return won


def _free_worker(
    session: Session,
    hostname: str,
    job_id: uuid.UUID,
    now: datetime,
    *,
    loaded: str | None = None,
) -> None:
    """The worker holds the job no more: idle again (unless draining), with the model its
    render process holds loaded now (``loaded``, a catalog key; the dispatcher sends that
    model's jobs here first)."""
    session.execute(
        update(Worker)
        .where(Worker.hostname == hostname, Worker.current_job_id == job_id)
        .values(current_job_id=None, last_heartbeat=now, loaded_model=loaded)
    )
    session.execute(
        update(Worker)
        .where(Worker.hostname == hostname, Worker.state == WorkerState.BUSY)
        .values(state=WorkerState.IDLE)
    )


def _hand_back_failed(
    db: Database, settings: Settings, claimed: Claimed, job_id: uuid.UUID, hostname: str, end: _End
) -> bool:
    """Give the job back to the queue instead of failing it, when its attempt failed here
    with an error that is not a precision error and another worker can take it
    (:func:`svdfarm.worker_health.hand_back_to`); True when handed back. Only while the claim
    ``claimed.token`` still holds the running job."""
    try:
        error_class: ErrorClass | None = ErrorClass(end.details.get("error_class"))
    except ValueError:
        error_class = None
    if error_class not in worker_health.NOT_PRECISION:
        return False

    def once() -> bool:
        with db.begin() as session:
            state = session.scalar(
                select(Job.state)
                .where(Job.id == job_id, Job.claim_token == claimed.token)
                .with_for_update()
            )
            if state is not JobState.RUNNING:
                return False
            other = worker_health.hand_back_to(session, settings, job_id, hostname, error_class)
            if other is None:
                return False
            assert error_class is not None
            message = (
                f"The attempt failed on {hostname} ({error_class.label}: "
                f"{end.error[:300]}); the job was handed back for another worker ({other})."
            )
            by = By(Actor.WORKER, hostname)
            if not lifecycle.hand_back(session, job_id, by=by, message=message, after_failure=True):
                return False
            _free_worker(
                session,
                hostname,
                job_id,
                utcnow(),
                loaded=loaded_model_key(settings, claimed.model),
            )
            return True

    return retrying(
        once, timeout_s=settings.db_retry_timeout_s, what=f"job {job_id}: handing it back"
    )


def loaded_model_key(settings: Settings, model: str) -> str | None:
    """The catalog key (svdfarm.catalog.queue_key) of ``model`` (a job's; blank: the
    worker's default) when this process holds its pipeline loaded now, else None."""
    from worker.pipeline import cached_placement

    spec = model or settings.model
    if cached_placement(spec, settings.models_dir) is None:
        return None
    return queue_key(settings.catalog, spec)


def _check_health(db: Database, hostname: str) -> None:
    """Flag this worker when it has failed too many jobs in a row the same way
    (:func:`svdfarm.worker_health.check_worker`); a failure to look is only logged."""
    try:
        with db.begin() as session:
            reason = worker_health.check_worker(session, hostname)
    except Exception:
        log.exception("could not check whether worker %s should be flagged", hostname)
        return
    if reason is not None:
        log.error("worker %s flagged, it takes no more jobs until cleared: %s", hostname, reason)


#: What a delivery that did not become a render tells the task, by the claim's outcome.
_NOT_RUN = {
    ClaimOutcome.MISSING: RunOutcome.MISSING,
    ClaimOutcome.CANCELED: RunOutcome.CANCELED,
    ClaimOutcome.FINISHED: RunOutcome.FINISHED,
    ClaimOutcome.RUNNING_ELSEWHERE: RunOutcome.RUNNING_ELSEWHERE,
    ClaimOutcome.POISONED: RunOutcome.POISONED,
    ClaimOutcome.TAKEN: RunOutcome.TAKEN,
    ClaimOutcome.DECLINED: RunOutcome.DECLINED,
}


def run_job(db: Database, settings: Settings, job_id: str, hostname: str) -> RunOutcome:
    """Render job ``job_id`` down the ladder and record everything; returns how it ended."""
    key = uuid.UUID(job_id)
    claimed = retrying(
        lambda: _claim(db, settings, key, hostname),
        timeout_s=settings.db_retry_timeout_s,
        what=f"job {job_id}: claiming it",
    )
    if isinstance(claimed, ClaimOutcome):
        log.info("job %s not run: %s", job_id, claimed.label)
        return _NOT_RUN[claimed]
    store = open_store(settings)
    previews = PreviewWriter(db, store, key, claimed.token, settings.preview_interval_s)
    finish = functools.partial(
        _finish,
        db,
        settings,
        claimed,
        job_id=key,
        hostname=hostname,
        store=store,
        previews=previews,
    )
    # The store sees only finished files, under this claim's names; nothing shared is written.
    with tempfile.TemporaryDirectory(prefix=f"svdfarm-{key}-") as scratch:
        rendered = _render(
            db, settings, claimed, job_id=key, hostname=hostname, scratch=scratch, preview=previews
        )
        if isinstance(rendered, _End):
            if rendered.outcome is not RunOutcome.FAILED:
                finish(end=rendered)
                return rendered.outcome
            # Failed here: another worker may take it (a bad worker does not eat the job).
            if _hand_back_failed(db, settings, claimed, key, hostname, rendered):
                previews.discard()
                log.warning("job %s failed here and was handed back for another worker", job_id)
                _check_health(db, hostname)
                return RunOutcome.HANDED_BACK
            won = finish(end=rendered)
            if won:
                _check_health(db, hostname)
            return rendered.outcome
        attempts, files = rendered
        try:
            for name, path in files.items():
                store.put_file(name, path)
        except Exception as exc:
            log.exception("job %s: the rendered video could not be stored", job_id)
            error = user_message(ErrorClass.STORAGE, exc)
            details = {"error_class": ErrorClass.STORAGE.value, "after_rendering": True}
            finish(end=_End(RunOutcome.FAILED, error=error, details=details), outputs=tuple(files))
            return RunOutcome.FAILED
    video_key, poster_key, *_others = files
    values = {
        "step": claimed.params.num_inference_steps,
        "video_key": video_key,
        "poster_key": poster_key,
        "output_keys": output_keys(key, claimed.token, claimed.params.formats),
        "preview_key": None,  # the video replaces the previews (deleted by _finish)
    }
    details = {"plan": attempts[-1].plan.name, "attempts": len(attempts)}
    end = _End(RunOutcome.SUCCEEDED, values=values, details=details)
    won = finish(end=end, outputs=tuple(files))
    return RunOutcome.SUCCEEDED if won else RunOutcome.SUPERSEDED


def _render(
    db: Database,
    settings: Settings,
    claimed: Claimed,
    *,
    job_id: uuid.UUID,
    hostname: str,
    scratch: str,
    preview: PreviewWriter | None = None,
) -> tuple[list[AttemptResult], dict[str, Path]] | _End:
    """Read the input from the store and render it into ``scratch``: the attempts and the
    files to store by key (video first, then poster, then the other output formats), or how
    the run ends without them; ``preview`` stores previews as it denoises."""
    video = Store.key(job_id, f"video.{claimed.token}.mp4")
    poster = Store.key(job_id, f"poster.{claimed.token}.png")
    files = {video: Path(scratch) / "video.mp4", poster: Path(scratch) / "poster.png"}
    extra_paths = {}
    for output, stored in output_keys(job_id, claimed.token, claimed.params.formats).items():
        if output != "mp4":
            extra_paths[output] = files[stored] = Path(scratch) / output_name(output)
    rows = _AttemptRows(
        db, job_id, hostname, token=claimed.token, retry_timeout_s=settings.db_retry_timeout_s
    )
    try:
        image = open_upright_rgb(open_store(settings).read_bytes(claimed.input_key))
        attempts = render_with_ladder(
            # The job's own model, which this worker advertised (svdfarm.catalog).
            settings.with_overrides(model=claimed.model or settings.model),
            claimed.params,
            plan=claimed.plan,
            reason=claimed.reason,
            image=image,
            video_path=files[video],
            poster_path=files[poster],
            report=_ProgressWriter(
                db, job_id, settings.progress_interval_s, By(Actor.WORKER, hostname)
            ),
            hooks=rows,
            extra_paths=extra_paths,
            preview=preview,
        )
    except JobCanceled:
        return _End(RunOutcome.CANCELED)
    except RenderFailed as failed:
        log.warning("job %s failed after %d attempt(s): %s", job_id, len(failed.attempts), failed)
        last = failed.attempts[-1]
        details: dict[str, Any] = {"error_class": last.error_class and last.error_class.value}
        return _End(RunOutcome.FAILED, error=str(failed), details=details)
    except Exception as exc:
        # Before the first attempt (the input could not be read): record it as one.
        log.exception("job %s failed before rendering", job_id)
        _record_early_failure(rows, claimed.plan, exc)
        error_class = classify(exc)
        details = {"error_class": error_class.value, "before_rendering": True}
        error = user_message(error_class, exc, time_limit_s=settings.task_soft_time_limit_s)
        return _End(RunOutcome.FAILED, error=error, details=details)
    return attempts, files


def _record_early_failure(rows: _AttemptRows, plan: Plan, exc: BaseException) -> None:
    """Record a failure that happened before rendering as a failed attempt."""
    attempt = AttemptResult(1, plan, None, outcome=AttemptOutcome.FAILED)
    attempt.error_class = classify(exc)
    attempt.error_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    attempt.message = str(exc)[:10_000]
    attempt.traceback = traceback.format_exc()
    rows.started(attempt)
    rows.finished(attempt)
