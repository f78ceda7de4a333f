"""The pages people use: the submit form, a job's status page, and its files."""

from __future__ import annotations

from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    send_file,
    url_for,
)

from svdfarm.images import format_size
from svdfarm.jobs import QueueUnavailable, submit_job, validate_submission
from svdfarm.params import FIELDS, PRECISIONS, ParamError, defaults_for
from svdfarm.storage import Storage
from web.cancel import cancel_job
from web.database import get_session
from web.jobs import describe_job, find_job

bp = Blueprint("pages", __name__)


def form_page(
    errors: dict[str, str] | None = None, status: int = 200, values: dict[str, Any] | None = None
) -> Any:
    """Render the submit form, with the values the person typed and any errors beside them."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    return (
        render_template(
            "index.html",
            fields=FIELDS,
            precisions=PRECISIONS,
            defaults=defaults_for(settings.model),
            values=values or {},
            errors=errors or {},
            model=settings.model,
            max_size=format_size(settings.max_upload_bytes),
        ),
        status,
    )


@bp.get("/")
def index() -> Any:
    """The submit form."""
    return form_page()


@bp.post("/")
def submit() -> Any:
    """Validate the form, record and enqueue the job, then show its status page."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    upload = request.files.get("image")
    data = upload.read() if upload is not None and upload.filename else None
    filename = upload.filename or "" if upload is not None else ""
    values = request.form.to_dict()
    try:
        submission = validate_submission(settings, request.form, data, filename)
    except ParamError as exc:
        return form_page(exc.errors, exc.status, values)
    try:
        job = submit_job(get_session(), current_app.extensions["celery"], settings, submission)
    except QueueUnavailable as exc:
        return form_page({"image": str(exc)}, 503, values)
    return redirect(url_for("pages.job", job_id=job.id), code=303)


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Any:
    """A job's status page: state, progress, attempts, and the video once done."""
    session = get_session()
    found = find_job(session, job_id)
    info = describe_job(session, found)
    return render_template("job.html", job=found, info=info, phase=info["phase_text"])


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Cancel from the status page, then show it again."""
    session = get_session()
    cancel_job(session, find_job(session, job_id))
    return redirect(url_for("pages.job", job_id=job_id), code=303)


def _send(job_id: str, attribute: str, mimetype: str, download_name: str) -> Any:
    """Send one stored file of a job, with range requests for seeking."""
    found = find_job(get_session(), job_id)
    key = getattr(found, attribute)
    storage = Storage(current_app.config["SVDFARM_SETTINGS"].storage_dir)
    if not key or not storage.exists(key):
        abort(404, description=f"Job {job_id} has no {download_name} (yet).")
    return send_file(
        storage.path(key),
        mimetype=mimetype,
        conditional=True,
        as_attachment=request.args.get("download") == "1",
        download_name=download_name,
        max_age=3600,
    )


@bp.get("/jobs/<job_id>/video.mp4")
def video(job_id: str) -> Any:
    """The job's MP4 (``?download=1`` to save it)."""
    return _send(job_id, "video_key", "video/mp4", f"svdfarm-{job_id}.mp4")


@bp.get("/jobs/<job_id>/poster.png")
def poster(job_id: str) -> Any:
    """A still frame of the job's video."""
    return _send(job_id, "poster_key", "image/png", f"svdfarm-{job_id}.png")


@bp.get("/jobs/<job_id>/input")
def input_image(job_id: str) -> Any:
    """The image the job was submitted with."""
    found = find_job(get_session(), job_id)
    ext = found.input_key.rsplit(".", 1)[-1]
    mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}.get(ext, "")
    return _send(job_id, "input_key", mime or "application/octet-stream", f"input.{ext}")
