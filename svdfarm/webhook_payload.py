"""The body of a webhook delivery: ``{"type", "timestamp", "data"}``, ``data`` being the job
as the API shows it (``GET /api/v1/jobs/<id>``), trimmed to what a receiver needs.

The core cannot build the API's absolute URLs (it does not know the host the web is reached
at), so the links are paths on the farm's web address (``/jobs/<id>/video.mp4``); the
owner is left out.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.sql import Select

from svdfarm.models import Job
from svdfarm.states import JobState
from svdfarm.webhook_states import WebhookEvent

#: The columns :func:`job_data` reads (a row of these, or a :class:`Job`).
COLUMNS = (
    Job.id,
    Job.owner,
    Job.webhook_url,
    Job.state,
    Job.phase,
    Job.progress,
    Job.step,
    Job.model,
    Job.queue,
    Job.priority,
    Job.input_filename,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.expired_at,
    Job.error,
    Job.video_key,
    Job.poster_key,
    Job.output_keys,
    Job.batch_id,
)
#: Each output format's path under ``/jobs/<id>/`` (web/pages.py serves them).
OUTPUT_FILES = {
    "mp4": "video.mp4",
    "webm": "video.webm",
    "gif": "video.gif",
    "frames": "frames.zip",
}
#: The longest error a payload carries.
MAX_ERROR = 2000
#: A server path in an error, replaced as the API replaces it (web.jobs.public_text).
_SERVER_PATH = re.compile(
    r"(?<![\w.:/\\~-])(?:file://)?(?:~?/|[A-Za-z]:\\)[\w.@+-]+(?:[/\\][\w.@+-]*)*"
)
SERVER_PATH_TEXT = "[a folder on the server]"


def job_columns(job_id: Any) -> Select:  # type: ignore[type-arg]
    """The query of one job's :data:`COLUMNS` (a plain row: no ORM object is refreshed)."""
    return select(*COLUMNS).where(Job.id == job_id)


def public_error(text: str | None) -> str | None:
    """A job's error without server paths, at most :data:`MAX_ERROR` characters."""
    if text is None:
        return None

    def replace(match: re.Match[str]) -> str:
        path = match[0]
        if text[: match.start()].lower().endswith(("url: ", "url ")):
            return path
        stripped = path.rstrip(".")
        return SERVER_PATH_TEXT + path[len(stripped) :]

    return _SERVER_PATH.sub(replace, text)[:MAX_ERROR]


def _iso(value: datetime | None) -> str | None:
    """A timestamp as ISO 8601, or None."""
    return value.isoformat() if value else None


def job_data(job: Any) -> dict[str, Any]:
    """The job's JSON for a payload, from a :class:`Job` or a row of :data:`COLUMNS`: the
    API's field names (``id``, ``state``, ``phase``, ``progress``, ``error``, ``video_url``,
    ``created_at``, ``finished_at``...), links as paths, no owner."""
    expired = job.expired_at is not None
    done = job.state is JobState.SUCCEEDED and bool(job.video_key) and not expired
    base = f"/jobs/{job.id}"
    outputs: dict[str, str] = {}
    if done:
        outputs["mp4"] = f"{base}/{OUTPUT_FILES['mp4']}"
        for name, file in OUTPUT_FILES.items():
            if name != "mp4" and name in (job.output_keys or {}):
                outputs[name] = f"{base}/{file}"
    return {
        "id": str(job.id),
        "state": job.state.value,
        "phase": job.phase.value,
        "progress": round(job.progress, 4),
        "step": job.step,
        "model": job.model,
        "queue": job.queue,
        "priority": job.priority,
        "input_filename": job.input_filename,
        "batch_id": str(job.batch_id) if job.batch_id else None,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "expired": expired,
        "error": public_error(job.error),
        "video_url": outputs.get("mp4"),
        "poster_url": f"{base}/poster.png" if job.poster_key and not expired else None,
        "outputs": outputs,
        "status_url": f"/api/v1/jobs/{job.id}",
        "page_url": base,
    }


def payload(event: WebhookEvent, at: datetime, job: Any) -> str:
    """The body of one delivery, as sent and signed: compact JSON."""
    body = {"type": event.value, "timestamp": at.isoformat(), "data": job_data(job)}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)
