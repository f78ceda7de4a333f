"""Server-sent events: a job's events and progress as they happen, and all of a caller's.

``GET /api/v1/jobs/<id>/events`` and ``GET /api/v1/events`` answer ``text/event-stream`` to a
request that accepts it (an ``EventSource`` does) and JSON otherwise. A stream sends:

- ``event: event``, with ``id: <event id>``: one row of the job's events (the lifecycle's
  table), its data the event as the JSON list shows it plus ``job`` and the job's ``state``;
- ``event: progress``, without an id: the job's phase, step, progress, ETA and ``preview_url``
  (a path under ``/jobs/<id>/``), at connect and whenever they change;
- a comment every :data:`KEEPALIVE_S` seconds, so proxies keep the connection and a closed one
  is noticed.

A client that reconnects sends ``Last-Event-ID`` (``EventSource`` does it by itself; ``?after=``
does the same) and gets every event after it before the live ones, so nothing is lost. A
job's stream ends after the event that ends the job; asked again once it has ended, with no
events after the client's last, it answers 204, which tells ``EventSource`` to stop.

Streams hold no database connection: the request reads what it replays, gives its session
back, and waits on its :class:`~svdfarm.feed.Watch`. Live messages come from the process's one
:class:`~svdfarm.feed.Feed` (one listener whatever the number of watchers). Under gunicorn's
gevent workers (``svdfarm web``'s default) a waiting stream is a greenlet, not a thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from svdfarm.feed import Feed, Message, MessageKind, Watch
from svdfarm.lifecycle import events_of
from svdfarm.models import Job, JobEvent
from svdfarm.storage import preview_step
from web.database import get_session, release_session
from web.jobs import (
    STEP_OVERRUN_FACTOR,
    STEP_OVERRUN_MIN_S,
    eta_for,
    eta_seconds,
    overrun_prefix,
    pace,
    phase_text,
)
from web.owners import current_caller

bp = Blueprint("streams", __name__, url_prefix="/api/v1")

EVENT_STREAM = "text/event-stream"
#: Seconds between keep-alive comments on a quiet stream.
KEEPALIVE_S = 15.0
#: Milliseconds a client waits before it reconnects (the stream's ``retry:``).
RETRY_MS = 3000
#: Events one JSON answer or one replay holds at most.
MAX_EVENTS = 1000
#: Events ``GET /api/v1/events`` answers by default.
DEFAULT_EVENTS = 100
#: The query parameters of ``GET /api/v1/events``.
EVENTS_PARAMETERS = ("after", "limit")


def init_app(app: Flask) -> None:
    """Give the app its live feed (its listener starts with the first watcher)."""
    urls = app.url_map.bind("localhost", script_name=app.config.get("APPLICATION_ROOT") or "/")

    def describe(job: Job, event: JobEvent | None) -> dict[str, Any]:
        """A message's data: the event with its job, or the job's progress."""
        if event is not None:
            return event_data(job, event)
        step = preview_step(job.preview_key, job.claim_token) if job.state.active else None
        preview = (
            urls.build("pages.preview", {"job_id": job.id, "step": step})
            if step is not None
            else None
        )
        return progress_data(job, preview)

    app.extensions["svdfarm.feed"] = Feed(app.extensions["svdfarm.db"].url, describe=describe)


def get_feed() -> Feed:
    """This process's live feed."""
    feed: Feed = current_app.extensions["svdfarm.feed"]
    return feed


def event_data(job: Job, event: JobEvent) -> dict[str, Any]:
    """An event message's data: the event as the JSON list shows it, its job and the job's
    state."""
    return {"job": str(job.id), "state": job.state.value, **event.as_dict()}


def event_text(job: Job, event: JobEvent) -> str:
    """A replayed event as a server-sent event, as the live feed sends it."""
    return sse(event_data(job, event), event=MessageKind.EVENT.value, event_id=event.id)


def progress_data(job: Job, preview_url: str | None) -> dict[str, Any]:
    """A progress message's data: what the status page's bar, phase, ETA and preview show.

    ``pace`` lets a client keep the time left going between messages (a message comes only
    when the step, phase or preview changes): the seconds left and since the last progress
    write when the message was made, the average step, and the words for a step that overruns
    (:func:`web.jobs.eta_for`'s "Step 7 of 12 running for ", then the time it has run).
    """
    eta = eta_seconds(job)
    found = pace(job)
    return {
        "job": str(job.id),
        "state": job.state.value,
        "phase": job.phase.value,
        "phase_label": phase_text(job),
        "progress": round(job.progress, 4),
        "step": job.step,
        "steps": job.num_inference_steps,
        "eta_s": round(eta, 1) if eta is not None else None,
        "eta_text": eta_for(job),
        "preview_url": preview_url,
        "pace": None
        if found is None
        else {
            "left_s": round(found.left_s, 2),
            "waited_s": round(found.waited_s, 2),
            "step_s": round(found.step_s, 3),
            "overrun_after_s": round(
                max(STEP_OVERRUN_MIN_S, STEP_OVERRUN_FACTOR * found.step_s), 2
            ),
            "running_for": overrun_prefix(job),
        },
    }


def wants_stream() -> bool:
    """True when the request accepts an event stream rather than JSON."""
    best = request.accept_mimetypes.best_match(["application/json", EVENT_STREAM])
    return bool(request.accept_mimetypes) and best == EVENT_STREAM


def sse(data: dict[str, Any], *, event: str, event_id: int | None = None) -> str:
    """One server-sent event: ``id:`` (when given), ``event:`` and one line of JSON data."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def message_text(message: Message) -> str:
    """A feed message as a server-sent event (encoded once, for all its watchers)."""
    if not message.encoded:
        text = sse(message.data, event=message.kind.value, event_id=message.event_id)
        message.encoded.append(text)
    return message.encoded[0]


class BadLastEventId(ValueError):
    """``Last-Event-ID`` or ``?after=`` is not an event id."""


def last_event_id() -> int:
    """The id of the last event the client has (``Last-Event-ID``, else ``?after=``), 0 for
    none; :class:`BadLastEventId` for anything but a whole number."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("after") or "0"
    if not raw.isdigit() or len(raw) > 18:
        raise BadLastEventId(
            f"Last-Event-ID (or after) must be an event id, a whole number; got {raw[:40]!r}."
        )
    return int(raw)


def _event_stream(body: Iterable[str]) -> Response:
    """A streaming response of ``body`` with the headers an event stream needs."""
    response = Response(body, mimetype=EVENT_STREAM)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _live(watch: Watch, sent: set[int], *, after: int, ends: bool) -> Iterator[str]:
    """The live part of a stream: each message the watch gets but the events the client has
    (those replayed, and those up to its last, ``after``: the feed may pass on an event
    written just before the stream began), keep-alives while quiet; with ``ends``, stop after
    a terminal event. Closes the watch."""
    try:
        while not watch.overflowed:
            message = watch.get(KEEPALIVE_S)
            if message is None:
                yield ": keep-alive\n\n"
                continue
            event_id = message.event_id
            if event_id is not None and (event_id in sent or event_id <= after):
                if ends and message.terminal:
                    return
                continue
            yield message_text(message)
            if ends and message.terminal:
                return
    finally:
        watch.close()


def job_stream(job: Job) -> Response:
    """``job``'s event stream (the caller may see it): its events after the client's last,
    its progress now, then both live until the event that ends it."""
    try:
        after = last_event_id()
    except BadLastEventId as exc:
        return jsonify({"error": str(exc)}), 400  # type: ignore[return-value]
    # No connection held while the watch starts (the process's listener may be starting).
    release_session()
    feed = get_feed()
    watch = feed.watch(job_id=job.id)  # before the replay: nothing falls between the two
    try:
        replay = events_of(get_session(), job.id, after=after)[-MAX_EVENTS:]
        if not replay and job.state.terminal:
            watch.close()
            return Response(status=204)
        first = [event_text(job, e) for e in replay]
        # An ended job's stream ends after its replay (its last event need not be the one that
        # ended it: retention's ``expired`` comes later).
        ended = bool(replay) and job.state.terminal
        if job.state.active:
            first.append(message_text(_progress_now(feed, job)))
    except BaseException:
        watch.close()
        raise
    release_session()
    sent = {e.id for e in replay}

    def body() -> Iterator[str]:
        """Replay, progress, then live messages."""
        try:
            yield f"retry: {RETRY_MS}\n\n"
            yield from first
            if ended:
                return
            yield from _live(watch, sent, after=after, ends=True)
        finally:
            watch.close()

    return _event_stream(body())


def _progress_now(feed: Feed, job: Job) -> Message:
    """The job's progress now, as a message (made here, not by the feed's listener)."""
    return Message(MessageKind.PROGRESS, job.id, job.owner, feed.describe(job, None))


def owner_events(
    session: Session, owners: Iterable[str], *, after: int, limit: int
) -> list[tuple[JobEvent, Job]]:
    """The events of ``owners``' jobs after event id ``after``, oldest first, at most ``limit``."""
    return list(
        session.execute(
            select(JobEvent, Job)
            .join(Job, Job.id == JobEvent.job_id)
            .where(Job.owner.in_(sorted(owners)), JobEvent.id > after)
            .order_by(JobEvent.id)
            .limit(limit)
        ).all()
    )


@bp.get("/events")
def caller_events() -> Any:
    """Every event of the caller's jobs: a stream (``Accept: text/event-stream``) of them and
    of their progress, live from now or from ``Last-Event-ID``; else JSON, ``?after=&limit=``
    -> ``{"events": [...], "last_id": ...}`` (oldest first)."""
    refused = {
        name: f"Unknown query parameter {name[:40]!r}: use {', '.join(EVENTS_PARAMETERS)}."
        for name in request.args
        if name not in EVENTS_PARAMETERS
    }
    limit = DEFAULT_EVENTS
    raw_limit = request.args.get("limit", "")
    if raw_limit:
        limit = int(raw_limit) if raw_limit.isdigit() and len(raw_limit) < 6 else 0
        if not 1 <= limit <= MAX_EVENTS:
            refused["limit"] = f"The limit must be a whole number from 1 to {MAX_EVENTS}."
    try:
        after = last_event_id()
    except BadLastEventId as exc:
        refused["after"] = str(exc)
    if refused:
        return jsonify({"error": " ".join(refused.values()), "fields": refused}), 400
    owners = current_caller().identities
    if not wants_stream():
        rows = owner_events(get_session(), owners, after=after, limit=limit)
        events = [{"job": str(job.id), **event.as_dict()} for event, job in rows]
        return jsonify({"events": events, "last_id": rows[-1][0].id if rows else after})
    release_session()  # none held while the watch starts
    watch = get_feed().watch(owners=owners)
    try:
        replay = owner_events(get_session(), owners, after=after, limit=MAX_EVENTS) if after else []
        first = [event_text(job, event) for event, job in replay]
    except BaseException:
        watch.close()
        raise
    release_session()
    sent = {event.id for event, _job in replay}

    def body() -> Iterator[str]:
        """Replay, then live messages, until the client goes."""
        try:
            yield f"retry: {RETRY_MS}\n\n"
            yield from first
            yield from _live(watch, sent, after=after, ends=False)
        finally:
            watch.close()

    return _event_stream(body())
