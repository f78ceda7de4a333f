"""The JSON API, ``/api/v1``: submit a job, read its state, list the caller's jobs, cancel one.

Who the caller is and which jobs it may see: :mod:`web.owners` (a job of someone else is
answered 404 as an unknown id).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from svdfarm.actions import cancel_job
from svdfarm.batches import BATCH_FIELDS, Upload, submit_batch, validate_batch
from svdfarm.jobs import (
    IdempotencyConflict,
    SubmitRefused,
    check_idempotency_key,
    repeated_fields,
    submit_job,
    unknown_fields,
    validate_submission,
)
from svdfarm.lifecycle import By, events_of
from svdfarm.models import utcnow
from svdfarm.params import ParamError
from svdfarm.registry import models_listing, online_workers, served_models
from svdfarm.states import Actor, JobState
from svdfarm.webhooks import secret_for
from web.database import get_db, get_session
from web.jobs import (
    DEFAULT_PAGE,
    MAX_PAGE,
    CursorError,
    batch_body_limit,
    batch_json,
    describe_job,
    describe_jobs,
    jobs_page,
    own_batch,
    own_job,
)
from web.owners import current_caller
from web.streams import job_stream, wants_stream

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def error_response(message: str, status: int, **extra: Any) -> Any:
    """``{"error": message}`` with an HTTP status."""
    body = {"error": message, **extra}
    return jsonify(body), status


def not_acceptable() -> Any | None:
    """406 when the request's ``Accept`` rules JSON out (every answer here is JSON), else
    None; no ``Accept`` header accepts anything."""
    accept = request.accept_mimetypes
    if not accept or accept.best_match(["application/json"]):
        return None
    return error_response(
        f"This answers application/json only; the request accepts {str(accept)[:200]}.", 406
    )


@bp.post("/jobs")
def create_job() -> Any:
    """Multipart ``image`` plus SVD's fields -> 201 with the new job's id and status URL.

    An ``Idempotency-Key`` header makes retries safe: the same key with the same request
    answers with the job the first request made (header ``Idempotent-Replayed: true``).
    """
    from web.security import client_address

    settings = current_app.config["SVDFARM_SETTINGS"]
    if request.mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded", ""):
        return error_response(
            "The API takes multipart/form-data: the image in a part named 'image' and each "
            f"setting as a form field (this request was {request.mimetype or 'without a type'}).",
            415,
        )
    refused = {
        **unknown_fields(request.form, request.files),
        **repeated_fields(request.form, request.files),
    }
    if refused:
        return error_response(" ".join(refused.values()), 400, fields=refused)
    upload = request.files.get("image")
    data = upload.read() if upload is not None else None
    filename = (upload.filename or "") if upload is not None else ""
    try:
        key = check_idempotency_key(request.headers.get("Idempotency-Key"))
        # Read once: without a model, the default is the first one a live worker serves; and
        # routing needs the same workers.
        online = online_workers(get_session(), settings)
        served = (
            ()
            if request.form.get("model")
            else served_models(get_session(), settings, online=online)
        )
        submission = validate_submission(settings, request.form, data, filename, served=served)
    except ParamError as exc:
        return error_response(str(exc), exc.status, fields=exc.errors)
    session = get_session()
    asked_at = utcnow()
    try:
        job = submit_job(
            session,
            current_app.extensions["celery"],
            settings,
            submission,
            client=client_address(),
            idempotency_key=key,
            by=By(Actor.API),
            owner=current_caller().owner,
            online=online,
        )
    except ParamError as exc:  # a priority above the owner's limit (403)
        return error_response(str(exc), exc.status, fields=exc.errors)
    except SubmitRefused as exc:
        response, status = error_response(str(exc), exc.status)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response, status
    except IdempotencyConflict as exc:
        return error_response(str(exc), 422)
    status_url = url_for("api.get_job", job_id=job.id, _external=True)
    body = {"id": str(job.id), "state": job.state.value, "status_url": status_url}
    headers = {"Location": status_url}
    if key is not None and job.created_at < asked_at:
        headers["Idempotent-Replayed"] = "true"
    return jsonify(body), 201, headers


def batch_uploads() -> list[Upload]:
    """The request's image parts as uploads, without empty ones (a form's file input with
    no file chosen sends one empty part)."""
    uploads = [Upload(f.read(), f.filename or "") for f in request.files.getlist("image")]
    return [u for u in uploads if u.data or u.filename]


@bp.post("/batches")
def create_batch() -> Any:
    """Multipart: one or more ``image`` parts, SVD's fields, and ``seeds`` or ``count`` ->
    201 with the batch's id and its jobs (one per image and seed), each with its status URL.
    """
    from web.security import client_address

    settings = current_app.config["SVDFARM_SETTINGS"]
    request.max_content_length = batch_body_limit(settings)
    if request.mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded", ""):
        return error_response(
            "The API takes multipart/form-data: each image in a part named 'image' and each "
            f"setting as a form field (this request was {request.mimetype or 'without a type'}).",
            415,
        )
    refused = {
        **unknown_fields(request.form, request.files, also=BATCH_FIELDS),
        **repeated_fields(request.form, request.files, images=False),
    }
    for name in BATCH_FIELDS:
        if len(request.form.getlist(name)) > 1:
            refused[name] = f"{name.capitalize()} was sent more than once; send it once."
    if refused:
        return error_response(" ".join(refused.values()), 400, fields=refused)
    try:
        submissions = validate_batch(settings, request.form, batch_uploads())
    except ParamError as exc:
        return error_response(str(exc), exc.status, fields=exc.errors)
    try:
        batch, jobs = submit_batch(
            get_session(),
            current_app.extensions["celery"],
            settings,
            submissions,
            client=client_address(),
            by=By(Actor.API),
            owner=current_caller().owner,
        )
    except ParamError as exc:  # a priority above the owner's limit (403)
        return error_response(str(exc), exc.status, fields=exc.errors)
    except SubmitRefused as exc:
        response, status = error_response(str(exc), exc.status)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response, status
    status_url = url_for("api.get_batch", batch_id=batch.id, _external=True)
    body = {
        "id": str(batch.id),
        "status_url": status_url,
        "page_url": url_for("pages.batch", batch_id=batch.id, _external=True),
        "jobs": [
            {
                "id": str(job.id),
                "state": job.state.value,
                "seed": job.seed,
                "input_filename": job.input_filename,
                "status_url": url_for("api.get_job", job_id=job.id, _external=True),
            }
            for job in jobs
        ],
    }
    return jsonify(body), 201, {"Location": status_url}


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Any:
    """The batch's jobs, each as ``GET /api/v1/jobs/<id>`` shows it, and their totals."""
    session = get_session()
    return jsonify(batch_json(session, own_batch(session, batch_id)))


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    """The job's state, progress, attempts, and its video URL once it succeeded."""
    session = get_session()
    return jsonify(describe_job(session, own_job(session, job_id)))


@bp.get("/models")
def models() -> Any:
    """The models jobs may name (``SVDFARM_MODELS``), each with its defaults and whether a
    live worker serves it now, and the default one."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    return jsonify(models_listing(get_session(), settings))


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str) -> Any:
    """The job's events in order: every move of its state and change of its phase. To a
    request that accepts ``text/event-stream``, a live stream of them and of the job's
    progress instead (:mod:`web.streams`)."""
    session = get_session()
    job = own_job(session, job_id)
    if wants_stream():
        return job_stream(job)
    return jsonify({"events": [e.as_dict() for e in events_of(session, job.id)]})


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Cancel a queued job at once, or ask a running one to stop at its next step."""
    session = get_session()
    job = own_job(session, job_id)
    change = cancel_job(session, job.id, by=By(Actor.API))
    if not change.done:
        return error_response(f"The job is already {job.state.label}; nothing to cancel.", 409)
    return jsonify(describe_job(session, job)), 202


#: The query parameters of ``GET /api/v1/jobs``.
LIST_PARAMETERS = ("state", "limit", "cursor")


@bp.get("/jobs")
def list_jobs() -> Any:
    """The caller's jobs, newest first, a page at a time: ``?state=&limit=&cursor=`` ->
    ``{"jobs": [...], "next_cursor": ...}`` (an admin lists its own jobs too, not everyone's)."""
    refused = {
        name: f"Unknown query parameter {name[:40]!r}: use {', '.join(LIST_PARAMETERS)}."
        for name in request.args
        if name not in LIST_PARAMETERS
    }
    for name in LIST_PARAMETERS:
        if len(request.args.getlist(name)) > 1:
            refused[name] = f"The {name} parameter was sent more than once; send it once."
    state: JobState | None = None
    raw_state = request.args.get("state", "")
    if raw_state and "state" not in refused:
        try:
            state = JobState(raw_state)
        except ValueError:
            states = ", ".join(s.value for s in JobState)
            refused["state"] = f"The state {raw_state[:40]!r} is not one of {states}."
    limit = DEFAULT_PAGE
    raw_limit = request.args.get("limit", "")
    if raw_limit and "limit" not in refused:
        limit = int(raw_limit) if raw_limit.isdigit() and len(raw_limit) < 6 else 0
        if not 1 <= limit <= MAX_PAGE:
            refused["limit"] = f"The limit must be a whole number from 1 to {MAX_PAGE}."
    if refused:
        return error_response(" ".join(refused.values()), 400, fields=refused)
    session = get_session()
    try:
        jobs, next_cursor = jobs_page(
            session,
            current_caller().identities,
            limit=limit,
            cursor=request.args.get("cursor") or None,
            state=state,
        )
    except CursorError as exc:
        return error_response(str(exc), 400, fields={"cursor": str(exc)})
    return jsonify({"jobs": describe_jobs(session, jobs), "next_cursor": next_cursor})


@bp.get("/webhooks/secret")
def webhook_secret() -> Any:
    """The caller's own webhook signing secret, ``{"key": "whsec_..."}`` (made on first use):
    every delivery of its jobs is signed with it. In open mode a caller without a key is its
    address's anonymous owner, and gets that owner's secret."""
    owner = current_caller().owner
    # A GET's session reads outside a transaction; making the secret needs one.
    with get_db().session() as session, session.begin():
        key = secret_for(session, owner)
    return jsonify({"key": key})
