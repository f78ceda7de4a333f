"""The pages people use: the submit form, a job's status page, its files, "My jobs" (the
caller's jobs, from the database), and a user's login and logout.

Who the caller is and which jobs it may see: :mod:`web.owners` (this blueprint installs its
gate: in keys mode these pages send a caller without a login to ``/login``). A job of
someone else is answered 404 exactly as an unknown id.
"""

from __future__ import annotations

import io
import tempfile
import uuid
import zipfile
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
    url_for,
)
from werkzeug.datastructures import MultiDict

from svdfarm.actions import cancel_job
from svdfarm.batches import BATCH_FIELDS, MAX_BATCH_JOBS, Upload, submit_batch, validate_batch
from svdfarm.catalog import find_entry
from svdfarm.db import is_unavailable
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
    OUTPUT_FIELDS,
    OUTPUT_FORMATS,
    PRECISIONS,
    SIZE_MULTIPLE,
    ParamError,
    defaults_for,
    is_tiny,
    size_presets,
)
from svdfarm.registry import models_listing, served_models
from svdfarm.settings import AuthMode, Settings
from svdfarm.states import Actor, JobState
from svdfarm.storage import open_store, output_name
from svdfarm.users import MAX_PRIORITY, MIN_PRIORITY, check_login
from web import owners
from web.auth import LoginLimiter, too_many_failures
from web.auth import limiter as auth_limiter
from web.database import get_session
from web.jobs import (
    DEFAULT_PAGE,
    CursorError,
    batch_body_limit,
    batch_json,
    describe_job,
    event_text,
    jobs_page,
    override_text,
    own_batch,
    own_job,
    place_text,
    public_messages,
    public_text,
)
from web.security import CSRF_FIELD, check_csrf, client_address, csrf_problem

bp = Blueprint("pages", __name__)
bp.before_app_request(owners.gate)

#: How long a presigned S3 link of a download stays valid; the page asks again on each view.
DOWNLOAD_URL_EXPIRES_S = 300
#: The form fields "render again" may prefill from the query string.
PREFILL = (*FIELDS, "precision", *OUTPUT_FIELDS, "model", "priority", "webhook_url")
#: The users' login limiter, in the app's extensions (the admin login has its own).
_USER_LIMITER_KEY = "svdfarm.user_limiter"
#: The status page's names of the parameters that are not numbers of FIELDS.
EXTRA_LABELS = {"output_formats": "Outputs", "loop": "Loop"}
#: How much of a batch's zip is built in memory before it spills to a temporary file.
BATCH_ZIP_MEMORY_BYTES = 32 * 1024 * 1024
#: Each output format's MIME type, for serving it.
OUTPUT_TYPES = {
    "mp4": "video/mp4",
    "webm": "video/webm",
    "gif": "image/gif",
    "frames": "application/zip",
}
#: The form's own fields besides a submission's: its CSRF token, and the job whose stored
#: image "render again" reuses.
AGAIN_FIELD = "again"
FORM_ONLY_FIELDS = (CSRF_FIELD, AGAIN_FIELD)


@bp.app_context_processor
def _navigation() -> dict[str, Any]:
    """Lets every template ask whether an endpoint exists (the admin link needs its blueprint),
    and who is logged in (the header's name and log-out button)."""
    return {
        "has_endpoint": lambda name: name in current_app.view_functions,
        "signed_in": owners.signed_in,
        "keys_mode": current_app.config["SVDFARM_SETTINGS"].auth is AuthMode.KEYS,
    }


def _served_models(settings: Settings) -> set[str]:
    """The models live workers serve, or none known when the database is away: the bare
    form needs no database (it offers the catalog, ``SVDFARM_MODEL``'s model first)."""
    session = get_session()
    try:
        return served_models(session, settings)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        session.rollback()
        return set()


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
    # The model dropdown: the catalog, the one asked (or the default: the first a live worker
    # serves) selected; the form's defaults and size presets are that model's.
    listing = models_listing(get_session(), settings, served=_served_models(settings))
    chosen = find_entry(settings.catalog, str((values or {}).get("model") or listing["default"]))
    model = chosen.source if chosen is not None else settings.model
    return (
        render_template(
            "index.html",
            fields=FIELDS,
            precisions=PRECISIONS,
            output_formats=OUTPUT_FORMATS,
            defaults=defaults_for(model),
            values=values or {},
            errors=errors or {},
            model=model,
            models=listing["models"],
            chosen_model=chosen.id if chosen is not None else listing["default"],
            max_size=format_size(settings.max_upload_bytes),
            again=again,
            again_stored=stored,
            tiny=is_tiny(model),
            size_step=SIZE_MULTIPLE,
            presets=size_presets(model),
            min_priority=MIN_PRIORITY,
            max_priority=MAX_PRIORITY,
            priority_limit=owners.max_priority(),
            max_batch_jobs=MAX_BATCH_JOBS,
        ),
        status,
    )


def readable_job(job_id: str) -> Job | None:
    """The job with this id when the caller may read it, else None (a malformed or unknown id,
    or a job of someone else: the same). "Render again" copies the job's stored image."""
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        return None
    job = get_session().get(Job, key)
    return job if job is not None and owners.may_see(job) else None


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


def joined_formats(form: MultiDict[str, str]) -> MultiDict[str, str]:
    """The form with its output format checkboxes (one ``output_formats`` per box ticked)
    joined into the one comma-separated field the validator reads."""
    ticked = form.getlist("output_formats")
    if len(ticked) < 2:
        return form
    joined = form.copy()
    joined.setlist("output_formats", [",".join(ticked)])
    return joined


def again_params(params: dict[str, Any]) -> dict[str, Any]:
    """A job's parameters as "render again" puts them in the form's query string (a flag as
    ``true`` or ``false``, as the form reads it)."""
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in params.items()}


@bp.post("/")
def submit() -> Any:
    """Validate the form, record and enqueue the job, then show its status page.

    A form without this session's CSRF token is refused (400) before anything is read into a
    job; a submission over the farm's limits gets the form back with the reason, its status
    (429 or 503) and ``Retry-After``.
    """
    settings = current_app.config["SVDFARM_SETTINGS"]
    request.max_content_length = batch_body_limit(settings)  # several images make a batch
    form = joined_formats(request.form)
    values = {k: v for k, v in form.to_dict().items() if k in (*PREFILL, *BATCH_FIELDS)}
    asked = form.get(AGAIN_FIELD, "").strip()
    again = readable_job(asked) if asked else None
    problem = csrf_problem()
    if problem:
        return form_page({"csrf": problem}, 400, values, again)
    refused = {
        **unknown_fields(form, request.files, also=(*FORM_ONLY_FIELDS, *BATCH_FIELDS)),
        **repeated_fields(form, request.files, images=False),  # several images: a batch
    }
    if refused:
        return form_page(refused, 400, values, again)
    chosen = [f for f in request.files.getlist("image") if f.filename]
    # Several images, or seeds or a count (as POST /api/v1/batches takes them): a batch.
    seeded = any(str(form.get(name) or "").strip() for name in BATCH_FIELDS)
    if len(chosen) > 1 or (chosen and seeded):
        return submit_form_batch(form, [Upload(f.read(), f.filename or "") for f in chosen])
    if seeded:
        message = "Seeds and count make a batch of the images you choose: choose the image again."
        return form_page({"seeds": message}, 400, values, again)
    upload = request.files.get("image")
    data = upload.read() if upload is not None and upload.filename else None
    filename = upload.filename or "" if upload is not None else ""
    unusable = ""
    if data is None and asked:
        data, filename, unusable = stored_input(again, asked)
    try:
        submission = validate_submission(settings, form, data, filename)
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
            owner=owners.submitting_caller().owner,
        )
    except ParamError as exc:  # a priority above the owner's limit (403)
        return form_page(exc.errors, exc.status, values, again)
    except SubmitRefused as exc:
        response = make_response(form_page({"job": str(exc)}, exc.status, values, again))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return redirect(url_for("pages.job", job_id=job.id), code=303)


def submit_form_batch(form: MultiDict[str, str], uploads: list[Upload]) -> Any:
    """Several images chosen on the form: one job each, with the form's settings, as a batch;
    its page next (or the form again with the reasons)."""
    settings = current_app.config["SVDFARM_SETTINGS"]
    values = {k: v for k, v in form.to_dict().items() if k in (*PREFILL, *BATCH_FIELDS)}
    fields = {k: v for k, v in form.items() if k not in FORM_ONLY_FIELDS}
    try:
        submissions = validate_batch(settings, fields, uploads)
    except ParamError as exc:
        return form_page(exc.errors, exc.status, values)
    try:
        found, _jobs = submit_batch(
            get_session(),
            current_app.extensions["celery"],
            settings,
            submissions,
            client=client_address(),
            by=By(Actor.WEB),
            owner=owners.submitting_caller().owner,
        )
    except ParamError as exc:  # a priority above the owner's limit (403)
        return form_page(exc.errors, exc.status, values)
    except SubmitRefused as exc:
        response = make_response(form_page({"job": str(exc)}, exc.status, values))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    return redirect(url_for("pages.batch", batch_id=found.id), code=303)


@bp.get("/batches/<batch_id>")
def batch(batch_id: str) -> Any:
    """A batch's page: every job's state and progress, its poster once done, and the zip."""
    session = get_session()
    found = own_batch(session, batch_id)
    info = batch_json(session, found)
    return render_template("batch.html", batch=found, info=info)


@bp.get("/batches/<batch_id>/outputs.zip")
def batch_outputs(batch_id: str) -> Any:
    """Every output the batch's jobs have made so far, in one zip (``01-seed42-video.mp4``,
    ``01-seed42-frames.zip``...); 404 while none has."""
    found = own_batch(get_session(), batch_id)
    storage = open_store(current_app.config["SVDFARM_SETTINGS"])
    spool = tempfile.SpooledTemporaryFile(max_size=BATCH_ZIP_MEMORY_BYTES)
    written = 0
    with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_STORED) as archive:
        for number, each in enumerate(found.jobs, start=1):
            if each.state is not JobState.SUCCEEDED or each.expired_at is not None:
                continue
            keys = each.output_keys or {"mp4": each.video_key or ""}
            for output in OUTPUT_FORMATS:
                key = keys.get(output)
                if not key:
                    continue
                try:
                    data = storage.read_bytes(key)
                except FileNotFoundError:
                    continue
                archive.writestr(f"{number:02d}-seed{each.seed}-{output_name(output)}", data)
                written += 1
    if not written:
        spool.close()
        abort(404, description=f"Batch {batch_id} has no outputs (yet).")
    spool.seek(0)
    return send_file(
        spool,
        mimetype="application/zip",
        as_attachment=True,
        download_name=f"svdfarm-batch-{found.id}.zip",
    )


@bp.get("/jobs/<job_id>")
def job(job_id: str) -> Any:
    """A job's status page: state, progress, attempts, and the video once done."""
    session = get_session()
    found = own_job(session, job_id)
    info = describe_job(session, found)
    again = url_for(
        "pages.index",
        again=info["id"],
        **again_params({**info["params"], "priority": info["priority"]}),
    )
    return render_template(
        "job.html",
        job=found,
        info=info,
        phase=info["phase_label"],
        waiting=_waiting_text(info["waiting"]),
        place=place_text(info["place"]),
        again_url=again,
        error=public_text(found.error),
        messages=public_messages(found),
        overrides=override_text(found.dtypes, found.casts),
        labels={**{name: field.label for name, field in FIELDS.items()}, **EXTRA_LABELS},
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
    """ "My jobs": the caller's jobs, newest first, however they were submitted (the form, the
    API, a batch), with thumbnails, a page at a time (``?cursor=`` as the API's)."""
    cursor = request.args.get("cursor") or None
    try:
        jobs, next_cursor = jobs_page(
            get_session(), owners.current_caller().identities, limit=DEFAULT_PAGE, cursor=cursor
        )
    except CursorError as exc:
        abort(400, description=str(exc))
    return render_template(
        "recent.html", jobs=jobs, next_cursor=next_cursor, first_page=cursor is None
    )


@bp.post("/jobs/<job_id>/cancel")
def cancel(job_id: str) -> Any:
    """Cancel from the status page (with the form's CSRF token), then show it again."""
    check_csrf()
    session = get_session()
    cancel_job(session, own_job(session, job_id).id, by=By(Actor.WEB))
    return redirect(url_for("pages.job", job_id=job_id), code=303)


def _send(job_id: str, attribute: str, mimetype: str, download_name: str) -> Any:
    """Send one stored file of a job (the key in its column ``attribute``)."""
    found = own_job(get_session(), job_id)
    return _send_key(job_id, getattr(found, attribute), mimetype, download_name)


def _send_key(job_id: str, key: str | None, mimetype: str, download_name: str) -> Any:
    """Send the stored file ``key`` of a job, with range requests for seeking.

    From S3 the browser is redirected to a presigned URL valid a few minutes, unless
    ``SVDFARM_STORAGE_PROXY`` asks the web to fetch the object and send it itself.
    """
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


@bp.get("/jobs/<job_id>/video.webm", defaults={"output": "webm"})
@bp.get("/jobs/<job_id>/video.gif", defaults={"output": "gif"})
@bp.get("/jobs/<job_id>/frames.zip", defaults={"output": "frames"})
def output(job_id: str, output: str) -> Any:
    """One of the job's other output formats: the WebM, the GIF, the zip of its frames."""
    found = own_job(get_session(), job_id)
    name = output_name(output)
    download = f"svdfarm-{job_id}{name.removeprefix('video')}"
    if output == "frames":
        download = f"svdfarm-{job_id}-frames.zip"
    return _send_key(job_id, found.output_key(output), OUTPUT_TYPES[output], download)


@bp.get("/jobs/<job_id>/poster.png")
def poster(job_id: str) -> Any:
    """A still frame of the job's video."""
    return _send(job_id, "poster_key", "image/png", f"svdfarm-{job_id}.png")


@bp.get("/jobs/<job_id>/preview.jpg")
def preview(job_id: str) -> Any:
    """The latest preview of a running job's middle frame (``?step=`` only busts caches)."""
    return _send(job_id, "preview_key", "image/jpeg", f"svdfarm-{job_id}-preview.jpg")


@bp.get("/jobs/<job_id>/input")
def input_image(job_id: str) -> Any:
    """The image the job was submitted with."""
    found = own_job(get_session(), job_id)
    ext = found.input_key.rsplit(".", 1)[-1]
    mime = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}.get(ext, "")
    return _send(job_id, "input_key", mime or "application/octet-stream", f"input.{ext}")


def _user_limiter() -> LoginLimiter:
    """The running app's limiter of failed user logins (not the admin's), made on first use."""
    return auth_limiter(_USER_LIMITER_KEY)


def _login_page(error: str = "", status: int = 200, name: str = "") -> Any:
    """The login form, with what went wrong."""
    target = owners.safe_next(request.values.get("next"))
    return render_template("login.html", error=error, name=name, next=target), status


@bp.get("/login")
def login() -> Any:
    """A user's login form (name and password; ``svdfarm users add --password``)."""
    return _login_page()


@bp.post("/login")
def login_post() -> Any:
    """Check the name and password: on success a fresh session holds the user (no fixation)
    and the browser goes on to ``next``; a wrong pair is answered 401, too many from one
    address 429 with ``Retry-After`` (as the admin's login)."""
    name = request.form.get("name", "").strip()[:64]
    problem = csrf_problem()
    if problem:
        return _login_page(problem, 400, name)
    limiter, client = _user_limiter(), client_address()
    wait = limiter.retry_after(client)
    if wait:
        page, status = _login_page(too_many_failures(wait), 429, name)
        return page, status, {"Retry-After": str(wait)}
    user = check_login(get_session(), name, request.form.get("password", ""))
    if user is None:
        limiter.failed(client)
        return _login_page("Wrong name or password (or the account is disabled).", 401, name)
    limiter.reset(client)
    owners.log_in_user(user)
    return redirect(owners.safe_next(request.form.get("next")), code=303)


@bp.post("/logout")
def logout() -> Any:
    """End the login (with the form's CSRF token), then show the login page."""
    check_csrf()
    owners.log_out()
    return redirect(url_for("pages.login"), code=303)
