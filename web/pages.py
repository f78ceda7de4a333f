"""The pages people use: the submit form, a job's status page, its files, and the jobs this
browser submitted ("My jobs", kept in the signed session cookie)."""

from __future__ import annotations

import io
import uuid
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
    send_file,
    send_from_directory,
    session,
    url_for,
)
from sqlalchemy import select

from svdfarm.actions import cancel_job
from svdfarm.images import format_size
from svdfarm.jobs import (
    SubmitRefused,
    repeated_fields,
    submit_job,
    unknown_fields,
    validate_submission,
)
from svdfarm.lifecycle import By, events_of
from svdfarm.models import Job
from svdfarm.params import (
    FIELDS,
    PRECISIONS,
    SIZE_MULTIPLE,
    ParamError,
    defaults_for,
    is_tiny,
    size_presets,
)
from svdfarm.states import Actor
from svdfarm.storage import open_store
from web.database import get_session
from web.jobs import describe_job, event_text, find_job, override_text, public_messages, public_text
from web.security import CSRF_FIELD, check_csrf, client_address, csrf_problem

bp = Blueprint("pages", __name__)

#: How long a presigned S3 link of a download stays valid; the page asks again on each view.
DOWNLOAD_URL_EXPIRES_S = 300
#: Session key of the ids of the jobs this browser submitted through the form, newest first.
RECENT_KEY = "recent_jobs"
#: How many of them the cookie keeps (50 UUIDs stay well under a cookie's 4 KB).
RECENT_LIMIT = 50
#: The form fields "render again" may prefill from the query string.
PREFILL = (*FIELDS, "precision")
#: The form's own fields besides a submission's: its CSRF token, and the job whose stored
#: image "render again" reuses.
AGAIN_FIELD = "again"
FORM_ONLY_FIELDS = (CSRF_FIELD, AGAIN_FIELD)


@bp.app_context_processor
def _navigation() -> dict[str, Any]:
    """Lets every template ask whether an endpoint exists (the admin link needs its blueprint)."""
    return {"has_endpoint": lambda name: name in current_app.view_functions}


def form_page(
    errors: dict[str, str] | None = None,
    status: int = 200,
    values: dict[str, Any] | None = None,
    again: Job | None = None,
) -> Any:
    """Render the submit form, with the values the person typed and any errors beside them.

    ``again`` is the job whose settings prefill the form and whose stored image it offers
    ("render again with these settings"); a file chosen on the form replaces that image.
    """
    settings = current_app.config["SVDFARM_SETTINGS"]
    stored = again is not None and open_store(settings).exists(again.input_key)
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
            again=again,
            again_stored=stored,
            tiny=is_tiny(settings.model),
            size_step=SIZE_MULTIPLE,
            presets=size_presets(settings.model),
        ),
        status,
    )


def readable_job(job_id: str) -> Job | None:
    """The job with this id when the caller may read it, else None (a malformed or unknown id).

    For now anyone who has a job's id may read it, as its status page shows; this is the one
    place that rule is written for "render again", which copies the job's stored image.
    """
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        return None
    return get_session().get(Job, key)


def stored_input(job: Job | None, asked: str) -> tuple[bytes | None, str, str]:
    """The stored image of the job "render again" names (``asked``): its bytes and file name,
    or None and why it cannot be used."""
    storage = open_store(current_app.config["SVDFARM_SETTINGS"])
    if job is None:
        return None, "", f"Job {asked[:40]!r} does not exist any more: choose an image."
    try:
        data = storage.read_bytes(job.input_key)
    except FileNotFoundError:
        return None, "", f"The image of job {job.id} is no longer stored: choose an image."
    extension = job.input_key.rsplit(".", 1)[-1]
    return data, job.input_filename or f"input.{extension}", ""


@bp.get("/")
def index() -> Any:
    """The submit form; query parameters named like its fields prefill it, and ``again``
    offers that job's stored image (render again)."""
    values = {name: request.args[name] for name in PREFILL if request.args.get(name)}
    asked = request.args.get(AGAIN_FIELD, "")
    return form_page(values=values, again=readable_job(asked) if asked else None)


@bp.get("/favicon.ico")
def favicon() -> Any:
    """The site's icon, where browsers look for it."""
    folder = current_app.static_folder
    assert folder is not None
    return send_from_directory(
        folder, "favicon.ico", mimetype="image/vnd.microsoft.icon", max_age=86400
    )


def remember_job(job_id: str) -> None:
    """Add a job to this browser's recent jobs, newest first, keeping the last fifty."""
    recent = [j for j in session.get(RECENT_KEY, []) if isinstance(j, str) and j != job_id]
    session[RECENT_KEY] = [job_id, *recent][:RECENT_LIMIT]
    session.permanent = True


@bp.post("/")
def submit() -> Any:
    """Validate the form, record and enqueue the job, then show its status page.

    A form without this session's CSRF token is refused (400) before anything is read into a
    job; a submission over the farm's limits gets the form back with the reason, its status
    (429 or 503) and ``Retry-After``.
    """
    settings = current_app.config["SVDFARM_SETTINGS"]
    values = {k: v for k, v in request.form.to_dict().items() if k in PREFILL}
    asked = request.form.get(AGAIN_FIELD, "").strip()
    again = readable_job(asked) if asked else None
    problem = csrf_problem()
    if problem:
        return form_page({"csrf": problem}, 400, values, again)
    refused = {
        **unknown_fields(request.form, request.files, also=FORM_ONLY_FIELDS),
        **repeated_fields(request.form, request.files),
    }
    if refused:
        return form_page(refused, 400, values, again)
    upload = request.files.get("image")
    data = upload.read() if upload is not None and upload.filename else None
    filename = upload.filename or "" if upload is not None else ""
    unusable = ""
    if data is None and asked:
        data, filename, unusable = stored_input(again, asked)
    try:
        submission = validate_submission(settings, request.form, data, filename)
    except ParamError as exc:
        errors = {**exc.errors, **({"image": unusable} if unusable else {})}
        return form_page(errors, exc.status, values, again)
    try:
        job = submit_job(
            get_session(),
            current_app.extensions["celery"],
            settings,
            submission,
            client=client_address(),
            by=By(Actor.WEB),
        )
    except SubmitRefused as exc:
        response = make_response(form_page({"job": str(exc)}, exc.status, values, again))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    remember_job(str(job.id))
    return redirect(url_for("pages.job", job_id=job.id), code=303)


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Any:
    """A job's status page: state, progress, attempts, and the video once done."""
    session = get_session()
    found = find_job(session, job_id)
    info = describe_job(session, found)
    again = url_for("pages.index", again=info["id"], **info["params"])
    return render_template(
        "job.html",
        job=found,
        info=info,
        phase=info["phase_label"],
        waiting=_waiting_text(info["waiting"]),
        again_url=again,
        error=public_text(found.error),
        messages=public_messages(found),
        overrides=override_text(found.dtypes, found.casts),
        labels={name: field.label for name, field in FIELDS.items()},
        events=events_of(session, found.id),
        event_text=event_text,
        show_details=False,
    )


def _waiting_text(waiting: str | None) -> str:
    """The registry's waiting reason as a sentence of its own on the status page."""
    if not waiting:
        return ""
    text = waiting.removeprefix("waiting: ")
    return text[:1].upper() + text[1:] + "."


@bp.get("/jobs")
def recent() -> Any:
    """The jobs this browser submitted through the form, newest first, with thumbnails.

    Jobs submitted through the API are not listed: the list lives in this browser's cookie.
    """
    keys = []
    for value in session.get(RECENT_KEY, []):
        try:
            keys.append(uuid.UUID(str(value)))
        except ValueError:
            continue
    jobs: list[Job] = []
    if keys:
        query = select(Job).where(Job.id.in_(keys)).order_by(Job.created_at.desc())
        jobs = list(get_session().scalars(query))
    return render_template("recent.html", jobs=jobs, limit=RECENT_LIMIT)


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Cancel from the status page (with the form's CSRF token), then show it again."""
    check_csrf()
    session = get_session()
    cancel_job(session, find_job(session, job_id).id, by=By(Actor.WEB))
    return redirect(url_for("pages.job", job_id=job_id), code=303)


def _send(job_id: str, attribute: str, mimetype: str, download_name: str) -> Any:
    """Send one stored file of a job, with range requests for seeking.

    From S3 the browser is redirected to a presigned URL valid a few minutes, unless
    ``SVDFARM_STORAGE_PROXY`` asks the web to fetch the object and send it itself.
    """
    found = find_job(get_session(), job_id)
    key = getattr(found, attribute)
    settings = current_app.config["SVDFARM_SETTINGS"]
    storage = open_store(settings)
    if not key or not storage.exists(key):
        abort(404, description=f"Job {job_id} has no {download_name} (yet).")
    attachment = request.args.get("download") == "1"
    path = storage.local_path(key)
    if path is None and not settings.storage_proxy:
        url = storage.download_url(
            key, filename=download_name, expires_s=DOWNLOAD_URL_EXPIRES_S, attachment=attachment
        )
        if url is not None:
            return redirect(url, code=302)
    return send_file(
        path if path is not None else io.BytesIO(storage.read_bytes(key)),
        mimetype=mimetype,
        conditional=True,
        as_attachment=attachment,
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
