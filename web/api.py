"""The JSON API, ``/api/v1``: submit a job, read its state, cancel it."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request, url_for

from svdfarm.jobs import QueueUnavailable, submit_job, validate_submission
from svdfarm.params import ParamError
from web.cancel import cancel_job
from web.database import get_session
from web.jobs import describe_job, find_job, job_json

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def error_response(message: str, status: int, **extra: Any) -> Any:
    """``{"error": message}`` with an HTTP status."""
    body = {"error": message, **extra}
    return jsonify(body), status


@bp.post("/jobs")
def create_job() -> Any:
    """Multipart ``image`` plus SVD's fields -> 201 with the new job's id and status URL."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    upload = request.files.get("image")
    data = upload.read() if upload is not None else None
    filename = (upload.filename or "") if upload is not None else ""
    try:
        submission = validate_submission(settings, request.form, data, filename)
    except ParamError as exc:
        return error_response(str(exc), exc.status, fields=exc.errors)
    session = get_session()
    try:
        job = submit_job(session, current_app.extensions["celery"], settings, submission)
    except QueueUnavailable as exc:
        return error_response(str(exc), 503)
    status_url = url_for("api.get_job", job_id=job.id, _external=True)
    body = {"id": str(job.id), "state": job.state.value, "status_url": status_url}
    return jsonify(body), 201, {"Location": status_url}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    """The job's state, progress, attempts, and its video URL once it succeeded."""
    session = get_session()
    return jsonify(describe_job(session, find_job(session, job_id)))


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Cancel a queued job at once, or ask a running one to stop at its next step."""
    session = get_session()
    job = find_job(session, job_id)
    changed = cancel_job(session, job)
    if not changed:
        return error_response(f"The job is already {job.state.label}; nothing to cancel.", 409)
    return jsonify(job_json(job)), 202
