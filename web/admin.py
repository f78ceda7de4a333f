"""The admin pages under ``/admin``: failed jobs, their attempts, requeue, workers and queues.

Every page needs the admin login and every POST its CSRF token (web/auth.py). Requeueing and
deleting go through :mod:`svdfarm.requeue`, canceling through :mod:`web.cancel`, so the pages
and any script change jobs the same way.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from flask import (
    Blueprint,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from markupsafe import Markup
from sqlalchemy import (
    ColumnElement,
    Row,
    ScalarSelect,
    Select,
    bindparam,
    false,
    func,
    or_,
    select,
    tuple_,
    union,
)
from sqlalchemy.orm import InstrumentedAttribute, Session

from svdfarm.actions import JobChange, cancel_job, delete_job, parse_job_id, requeue_jobs
from svdfarm.catalog import catalog_keys
from svdfarm.depths import BrokerUnavailable, queue_depths, waiting_jobs
from svdfarm.lifecycle import By, events_of, reprioritize
from svdfarm.models import Attempt, Job, Worker, list_order, utcnow
from svdfarm.queues import all_queues
from svdfarm.registry import effective_state
from svdfarm.states import Actor, AttemptOutcome, ErrorClass, JobState, WorkerState
from svdfarm.users import MAX_PRIORITY, MIN_PRIORITY
from svdfarm.webhooks import deliveries_of
from svdfarm.worker_health import clear_flag
from web import auth
from web.database import get_session
from web.jobs import event_text, find_job

bp = Blueprint("admin", __name__, url_prefix="/admin")
#: Who the admin pages act as in job events (one admin login for now).
ADMIN = By(Actor.ADMIN, "admin")

PAGE_SIZE = 50
#: The state filter's value (and label) for jobs in every state; a blank value means it too.
ANY_STATE = "any"
#: Skipped jobs named one by one after a bulk action; the rest are counted (the flash
#: messages travel in the session cookie, which must stay small).
MAX_LISTED = 5
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: A search's text held by more jobs than this is common: the page is filled by reading the
#: list's next :data:`SEARCH_WINDOW` jobs in order (see ``index``).
FOUND_CAP = 1000
SEARCH_WINDOW = 2000


@bp.record_once
def _setup(state: BlueprintSetupState) -> None:
    """Warn once per app when the admin password is not a hash."""
    auth.warn_if_plain(state.app.config["SVDFARM_SETTINGS"].admin_password)


bp.before_request(auth.admin_guard)


@bp.context_processor
def template_helpers() -> dict[str, Any]:
    """Template helpers of every admin page: the CSRF token, login state and value
    formatters (the other admin blueprints register this too)."""
    return {
        "csrf_token": auth.csrf_token,
        "admin_logged_in": auth.logged_in,
        "age": format_age,
        "memory": format_memory,
        "seconds": format_seconds,
    }


def format_age(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago ``moment`` was: ``12 s``, ``3 min``, ``2.5 h``, ``4 d``."""
    if moment is None:
        return ""
    return format_seconds(((now or utcnow()) - moment).total_seconds())


def format_seconds(value: float | None) -> str:
    """A duration as people read it: ``8.2 s``, ``3.5 min``, ``2.1 h``, ``1.3 d``."""
    if value is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.1f} s"


def format_memory(value: int | None) -> str:
    """A byte count in GiB (MiB below 1 GiB), as torch reports peak memory."""
    if value is None:
        return ""
    if value >= 1024**3:
        return f"{value / 1024**3:.2f} GiB"
    return f"{value / 1024**2:.0f} MiB"


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    """The login form; 5 failures per 15 minutes per client, then 429 with Retry-After."""
    target = auth.safe_next(request.values.get("next"), url_for("admin.index"))
    if request.method == "GET":
        if auth.logged_in():
            return redirect(target)
        return render_template("admin/login.html", next=target, error=None)
    limiter, client = auth.limiter(), auth.client_address()
    wait = limiter.retry_after(client)
    if wait:
        page = render_template("admin/login.html", next=target, error=auth.too_many_failures(wait))
        return make_response(page, 429, {"Retry-After": str(wait)})
    if auth.check_password(auth.admin_password(), request.form.get("password", "")):
        limiter.reset(client)
        auth.log_in()
        return redirect(target, code=303)
    limiter.failed(client)
    error = "Wrong password."
    if limiter.retry_after(client):
        error += " " + auth.too_many_failures(limiter.retry_after(client))
    return render_template("admin/login.html", next=target, error=error), 401


@bp.post("/logout")
def logout() -> Any:
    """End the admin session."""
    auth.log_out()
    return redirect(url_for("admin.login"), code=303)


@dataclass
class Filters:
    """The failed-jobs list's filters, read from the query string."""

    state: str = "failed"
    error_class: str = ""
    worker: str = ""
    model: str = ""
    since: date | None = None
    until: date | None = None
    q: str = ""
    #: The page's edge: jobs older than ``before`` or newer than ``after`` (a job's sort key,
    #: see :func:`parse_cursor`); neither: the newest.
    before: Cursor | None = None
    after: Cursor | None = None

    @classmethod
    def from_args(cls, args: Any) -> tuple[Filters, list[str]]:
        """Parse ``request.args``; returns the filters and a problem per ignored value."""
        problems: list[str] = []
        found = cls(state=args.get("state", "failed").strip())
        if found.state.lower() == ANY_STATE:  # the dropdown's own label
            found.state = ""
        if found.state not in {"", *(s.value for s in JobState)}:
            problems.append(f"Unknown state {found.state!r}: showing every state.")
            found.state = ""
        found.error_class = args.get("error_class", "").strip()
        if found.error_class not in {"", *(e.value for e in ErrorClass)}:
            problems.append(f"Unknown error class {found.error_class!r}: ignored.")
            found.error_class = ""
        found.worker = args.get("worker", "").strip()
        found.model = args.get("model", "").strip()
        found.q = args.get("q", "").strip()[:200]
        for name in ("since", "until"):
            raw = args.get(name, "").strip()
            if raw:
                try:
                    setattr(found, name, date.fromisoformat(raw))
                except ValueError:
                    problems.append(f"{name} {raw!r} is not a date (YYYY-MM-DD): ignored.")
        for name in ("before", "after"):
            raw = args.get(name, "").strip()
            if raw:
                cursor = parse_cursor(raw)
                if cursor is None:
                    problems.append(f"{name} {raw!r} is not a page mark: showing the newest.")
                setattr(found, name, cursor)
        if found.before and found.after:
            found.after = None
        return found, problems

    def args(self, **changes: Any) -> dict[str, Any]:
        """The filters as query arguments (blank ones left out), with ``changes`` applied."""
        values = {
            "state": self.state or ANY_STATE,
            "error_class": self.error_class,
            "worker": self.worker,
            "model": self.model,
            "since": self.since.isoformat() if self.since else "",
            "until": self.until.isoformat() if self.until else "",
            "q": self.q,
            "before": format_cursor(self.before) if self.before else "",
            "after": format_cursor(self.after) if self.after else "",
        }
        values.update(changes)
        # "state" is always there: "any" means every state, absent means failed.
        return {k: v for k, v in values.items() if v != ""}


#: A job's place in the list: (finished, else created), then its id.
Cursor = tuple[datetime, uuid.UUID]


def sort_key(job: Job | Row[Any]) -> Cursor:
    """Where ``job`` sits in the list, newest first: the cursor of a page's edge."""
    return (job.finished_at or job.created_at, job.id)


def format_cursor(cursor: Cursor) -> str:
    """``cursor`` as a query argument: microseconds since the epoch, ``_``, the job id."""
    moment, job_id = cursor
    micros = (moment - EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{job_id.hex}"


def parse_cursor(text: str) -> Cursor | None:
    """What :func:`format_cursor` wrote, or None for anything else."""
    micros, _, hex_id = text.partition("_")
    try:
        return EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id)
    except (ValueError, OverflowError):
        return None


def _like(text: str) -> str:
    """``text`` as a LIKE pattern matching it anywhere, wildcards escaped."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _last_error_class() -> ScalarSelect[Any]:
    """The error class of a job's latest attempt (correlated: read per listed row only)."""
    return (
        select(Attempt.error_class)
        .where(Attempt.job_id == Job.id)
        .order_by(Attempt.number.desc())
        .limit(1)
        .scalar_subquery()
    )


def _id_range(text: str) -> ColumnElement[bool] | None:
    """Jobs whose id is ``text`` or starts with its hex digits (a key range), or None when
    ``text`` cannot be the start of an id."""
    key = parse_job_id(text)
    if key is not None:
        return Job.id == key
    hex_part = text.replace("-", "").lower()
    if hex_part and len(hex_part) <= 32 and all(c in "0123456789abcdef" for c in hex_part):
        low = uuid.UUID(hex=hex_part.ljust(32, "0"))
        high = uuid.UUID(hex=hex_part.ljust(32, "f"))
        return Job.id.between(low, high)
    return None


def _search(text: str) -> ColumnElement[bool]:
    """Jobs whose id starts with ``text``, or whose error, file name or any attempt's message
    holds it, found from the texts' trigram indexes (PostgreSQL) before the jobs are read."""
    found = union(*(query for query in _text_queries(text)))
    matches = [Job.id.in_(found.scalar_subquery()), _id_range(text)]
    return or_(*(m for m in matches if m is not None))


def _text_queries(text: str) -> list[Select[Any]]:
    """The ids of the jobs whose error, file name or an attempt's message holds ``text``."""
    pattern = _like(text)
    return [
        select(Job.id).where(Job.error.ilike(pattern, escape="\\")),
        select(Job.id).where(Job.input_filename.ilike(pattern, escape="\\")),
        select(Attempt.job_id).where(Attempt.message.ilike(pattern, escape="\\")),
    ]


def found_ids(session: Session, text: str) -> set[uuid.UUID] | None:
    """Every job whose texts hold ``text`` (its id range aside), each text asked alone, or
    None when one of them holds it in more than :data:`FOUND_CAP` jobs (a common text)."""
    ids: set[uuid.UUID] = set()
    for query in _text_queries(text):
        got = session.scalars(query.limit(FOUND_CAP + 1)).all()
        if len(got) > FOUND_CAP:
            return None
        ids.update(got)
    return ids


def _matches(text: str) -> ColumnElement[bool]:
    """The same test as :func:`_search`, made on each row as it is read."""
    pattern = _like(text)
    matches = [
        Job.error.ilike(pattern, escape="\\"),
        Job.input_filename.ilike(pattern, escape="\\"),
        Job.attempts.any(Attempt.message.ilike(pattern, escape="\\")),
        _id_range(text),
    ]
    return or_(*(m for m in matches if m is not None))


def filtered_jobs(
    filters: Filters, *, recent: int = 0, found: Collection[uuid.UUID] | None = None
) -> Select[Job]:
    """Jobs matching ``filters``, newest first (older than ``before``, or the oldest first
    when newer than ``after``); error class is that of the last attempt.

    Flat in history: the order is an index (``ix_jobs_list_order``, and per state
    ``ix_jobs_state_list_order``) read from the page's edge, never an OFFSET or a count.
    A search takes the jobs ``found`` in the text indexes when given (see
    :func:`found_ids`), else with ``recent`` only the next ``recent`` jobs of the list,
    tested row by row, else every match from the text indexes (see :func:`index`).
    """
    when = list_order()
    stmt = select(Job)
    if filters.state:
        stmt = stmt.where(Job.state == JobState(filters.state))
    if filters.error_class:
        wanted = ErrorClass(filters.error_class)
        # With a state filter: the failure that put the job there (its last attempt); without
        # one, any attempt, so "jobs" from the failures-by-class table lists them all.
        if filters.state:
            stmt = stmt.where(_last_error_class() == wanted)
        else:
            stmt = stmt.where(Job.attempts.any(Attempt.error_class == wanted))
    if filters.worker:
        stmt = stmt.where(Job.attempts.any(Attempt.worker == filters.worker))
    if filters.model:
        stmt = stmt.where(Job.model == filters.model)
    if filters.since:
        stmt = stmt.where(when >= datetime.combine(filters.since, time(), timezone.utc))
    if filters.until:
        end = datetime.combine(filters.until + timedelta(days=1), time(), timezone.utc)
        stmt = stmt.where(when < end)
    if filters.q and found is not None:
        matches = [Job.id.in_(found) if found else false(), _id_range(filters.q)]
        stmt = stmt.where(or_(*(m for m in matches if m is not None)))
    elif filters.q and not recent:
        stmt = stmt.where(_search(filters.q))
    elif filters.q:
        # The next ``recent`` jobs of the list, each tested as it is read.
        window = _edge(filters, stmt, when).with_only_columns(Job.id).limit(recent)
        stmt = select(Job).where(Job.id.in_(window.correlate(None).scalar_subquery()))
        stmt = stmt.where(_matches(filters.q))
    return _edge(filters, stmt, when)


def _edge(filters: Filters, stmt: Select[Any], when: ColumnElement[datetime]) -> Select[Any]:
    """``stmt`` from the page's edge on, in the page's order."""
    if filters.after:
        stmt = stmt.where(tuple_(when, Job.id) > tuple_(*filters.after))
        return stmt.order_by(when, Job.id)
    if filters.before:
        stmt = stmt.where(tuple_(when, Job.id) < tuple_(*filters.before))
    return stmt.order_by(when.desc(), Job.id.desc())


def distinct_values(column: InstrumentedAttribute[str]) -> list[str]:
    """The distinct values of an indexed ``column``, in order, one index probe per value
    (a loose index scan: ``SELECT DISTINCT`` would read every row)."""
    return list(get_session().scalars(distinct_query(column)))


@functools.cache
def distinct_query(column: InstrumentedAttribute[str]) -> Select[tuple[str]]:
    """The query of :func:`distinct_values`: a recursive CTE, each step the next value up
    (built once per column: its construction costs more than its run)."""
    found = select(func.min(column).label("v")).cte("found", recursive=True)
    following = select(func.min(column)).where(column > found.c.v).scalar_subquery()
    found = found.union_all(select(following).where(found.c.v.is_not(None)))
    return select(found.c.v).where(found.c.v.is_not(None))


#: What a row of the list shows of its job, and no more: its texts and times. A page of 50
#: failed jobs reads none of their parameters.
LIST_COLUMNS = (
    Job.id,
    Job.state,
    Job.created_at,
    Job.finished_at,
    Job.input_filename,
    Job.queue,
    Job.error,
)


#: What a row shows of a job's last attempt: job id, worker, plan name, error class, message.
ListedAttempt = Row[uuid.UUID, str, str, ErrorClass | None, str | None]


@functools.cache
def _listed_attempts() -> Select[uuid.UUID, str, str, ErrorClass | None, str | None]:
    """The attempts of the listed jobs (parameter ``ids``), each job's in order, with what a
    row shows of its last one: no plan, no traceback. Built once."""
    return (
        select(
            Attempt.job_id, Attempt.worker, Attempt.plan_name, Attempt.error_class, Attempt.message
        )
        .where(Attempt.job_id.in_(bindparam("ids", expanding=True)))
        .order_by(Attempt.job_id, Attempt.number)
    )


def last_attempts(session: Session, rows: Sequence[Row[Any]]) -> dict[uuid.UUID, ListedAttempt]:
    """The last attempt of each job of ``rows`` that has one, by job id, in one read."""
    if not rows:
        return {}
    found = session.execute(_listed_attempts(), {"ids": [row.id for row in rows]})
    return {attempt.job_id: attempt for attempt in found}  # in order: the last one stays


@bp.get("/")
@auth.login_required
def index() -> Any:
    """Failed jobs (or any state), filtered and searched, with bulk actions; a page at a
    time from its edge (keyset), so a long history costs no more than a short one."""
    session = get_session()
    filters, problems = Filters.from_args(request.args)
    page = PAGE_SIZE + 1
    if not filters.q:
        rows = _rows(session, filtered_jobs(filters).limit(page))
    elif (found := found_ids(session, filters.q)) is not None:
        # A rare text: its few jobs, from the text indexes.
        rows = _rows(session, filtered_jobs(filters, found=found).limit(page))
    else:
        # A common one fills the page from the next jobs of the list, read in order; only
        # when it does not is every match looked up.
        window = filtered_jobs(filters, recent=SEARCH_WINDOW)
        rows = _rows(session, window.limit(page))
        if len(rows) < page:
            rows = _rows(session, filtered_jobs(filters).limit(page))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    if filters.after:  # read oldest first from the edge: shown newest first
        rows.reverse()
    paging = filters.after or filters.before
    newer = older = None
    if rows and (filters.before or (filters.after and more)):
        newer = filters.args(before="", after=format_cursor(sort_key(rows[0])))
    if rows and (more if not filters.after else True):
        older = filters.args(after="", before=format_cursor(sort_key(rows[-1])))
    return render_template(
        "admin/jobs.html",
        jobs=rows,
        last_attempts=last_attempts(session, rows),
        filters=filters,
        problems=problems,
        newest=filters.args(before="", after="") if paging else None,
        newer=newer,
        older=older,
        states=list(JobState),
        error_classes=list(ErrorClass),
        workers=distinct_values(Attempt.worker),
        models=distinct_values(Job.model),
        queues=all_queues(),
        back_to=request.full_path.rstrip("?"),
    )


def _rows(session: Session, stmt: Select[Job]) -> list[Row[Any]]:
    """The jobs of one page of the list, as plain rows of the columns a row shows
    (:data:`LIST_COLUMNS`): a page builds no ORM object."""
    return list(session.execute(stmt.with_only_columns(*LIST_COLUMNS)))


@bp.get("/jobs/<job_id>")
@auth.login_required
def job(job_id: str) -> Any:
    """One job with every attempt: plan and reason, error, full traceback, worker, memory."""
    return _job_page(job_id)


def _job_page(job_id: str, priority_error: str | None = None) -> str:
    """The job's page, with why its priority was not changed when it was not."""
    session = get_session()
    found = find_job(session, job_id)
    page = url_for("admin.job", job_id=found.id)
    return render_template(
        "admin/job.html",
        job=found,
        queues=all_queues(),
        back_to=request.full_path.rstrip("?") if request.method == "GET" else page,
        events=events_of(session, found.id),
        deliveries=deliveries_of(session, found.id),
        event_text=event_text,
        show_details=True,
        priority_error=priority_error,
        priorities=(MIN_PRIORITY, MAX_PRIORITY),
    )


@bp.post("/jobs/<job_id>/priority")
@auth.login_required
def priority(job_id: str) -> Any:
    """Change a queued job's priority, or move it to the front; the job's page again with
    the reason and 400 when the number or the job's state refuses it."""
    session = get_session()
    found = find_job(session, job_id)
    front = request.form.get("front") == "1"
    raw = request.form.get("priority", "").strip()
    try:
        wanted = None if front else int(raw)
    except ValueError:
        message = f"A priority is a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}."
        return _job_page(job_id, priority_error=message), 400
    try:
        new = reprioritize(session, found.id, by=ADMIN, priority=wanted, front=front)
    except ValueError as exc:  # out of range, or IllegalMove: no longer waiting
        session.rollback()
        return _job_page(job_id, priority_error=str(exc)), 400
    session.commit()
    flash(f"Priority is now {new}" + (" (moved to the front)." if front else "."), "ok")
    return redirect(url_for("admin.job", job_id=found.id), code=303)


@bp.post("/jobs/actions")
@auth.login_required
def actions() -> Any:
    """Requeue (with overrides), cancel or delete the selected jobs, then go back."""
    back = auth.safe_next(request.form.get("next"), url_for("admin.index"))
    ids = request.form.getlist("job")
    action = request.form.get("action", "")
    if not ids:
        flash("Select at least one job.", "bad")
        return redirect(back, code=303)
    session = get_session()
    settings = current_app.config["SVDFARM_SETTINGS"]
    changes: list[JobChange]
    if action == "requeue":
        try:
            changes = requeue_jobs(
                session,
                current_app.extensions["celery"],
                settings,
                ids,
                force_fp32=bool(request.form.get("force_fp32")),
                queue=request.form.get("queue"),
                casts_off=bool(request.form.get("casts_off")),
                by=ADMIN,
            )
        except ValueError as exc:
            flash(f"Nothing was requeued: {exc}", "bad")
            return redirect(back, code=303)
    elif action == "cancel":
        changes = [cancel_job(session, i, by=ADMIN) for i in ids]
    elif action == "delete":
        changes = [delete_job(session, settings, i) for i in ids]
        if any(c.done for c in changes) and back.startswith(url_for("admin.index") + "jobs/"):
            back = url_for("admin.index")  # the job's own page is gone
    else:
        flash(f"Unknown action {action[:40]!r}: choose requeue, cancel or delete.", "bad")
        return redirect(back, code=303)
    _report(action, changes)
    return redirect(back, code=303)


def _job_links(changes: list[JobChange]) -> Markup:
    """Links to the admin page and the status page of each job an action kept (the first
    :data:`MAX_LISTED`), for its flash message."""
    links = [
        Markup('<a href="{}">{}</a> (<a href="{}">status page</a>)').format(
            url_for("admin.job", job_id=c.job_id),
            c.job_id[:8],
            url_for("pages.job", job_id=c.job_id),
        )
        for c in changes[:MAX_LISTED]
    ]
    more = f", and {len(changes) - MAX_LISTED} more" if len(changes) > MAX_LISTED else ""
    return Markup(", ").join(links) + more


def _report(action: str, changes: list[JobChange]) -> None:
    """Flash what an action did: the one job's outcome, or a count and the skipped reasons;
    requeued and canceled jobs are linked, to follow them (a deleted one is gone)."""
    linked = [c for c in changes if c.done and action != "delete"]
    if len(changes) == 1:
        message = Markup.escape(changes[0].message)
        if linked:
            message += Markup(" Open: ") + _job_links(linked)
        flash(message, "ok" if changes[0].done else "bad")
        return
    done = sum(1 for c in changes if c.done)
    past = {"requeue": "requeued", "cancel": "canceled", "delete": "deleted"}[action]
    summary = Markup.escape(f"{done} of {len(changes)} jobs {past}.")
    if linked:
        summary += Markup(" Open: ") + _job_links(linked)
    flash(summary, "ok" if done else "bad")
    skipped = [c for c in changes if not c.done]
    for change in skipped[:MAX_LISTED]:
        flash(change.message, "bad")
    if len(skipped) > MAX_LISTED:
        flash(f"... and {len(skipped) - MAX_LISTED} more skipped.", "bad")


@bp.get("/workers")
@auth.login_required
def workers() -> Any:
    """Workers with their state and heartbeat (a flagged one with its reason and a button to
    clear it), queue depths, failures of the last 24 hours."""
    session = get_session()
    settings = current_app.config["SVDFARM_SETTINGS"]
    now = utcnow()
    rows = session.scalars(select(Worker).order_by(Worker.hostname)).all()
    states = {w.hostname: effective_state(w, settings, now) for w in rows}
    consumers: dict[str, list[str]] = {}
    for w in rows:
        if states[w.hostname] is not WorkerState.OFFLINE:
            for queue in w.queues:
                consumers.setdefault(queue, []).append(w.hostname)
    queued = waiting_jobs(session, [*all_queues(catalog_keys(settings.catalog)), *consumers])
    broker_error = None
    try:
        held = queue_depths(settings, queued, celery=current_app.extensions["celery"])
    except BrokerUnavailable as exc:
        held, broker_error = {}, str(exc)
    # What waits is what the database has queued. A canceled job's message stays in the
    # broker until a worker drops it, so messages count as waiting up to one per queued job
    # (fewer: the broker lost some, and the reaper publishes them again).
    depths = {q: min(n, queued[q]) for q, n in held.items()}
    shown = [q for q in depths if depths[q] or q in consumers or queued[q]]
    return render_template(
        "admin/workers.html",
        workers=rows,
        flag_text=flag_text,
        states=states,
        now=now,
        depths=[(q, depths[q], queued[q], consumers.get(q, [])) for q in shown],
        broker_error=broker_error,
        failures=failures_by_class(since=now - timedelta(hours=24)),
    )


#: A job id in a flag's reason (svdfarm.worker_health names them in full).
_JOB_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")


def flag_text(reason: str | None) -> Markup:
    """A flagged worker's reason, escaped, each job id in it a link to its admin page."""
    text = reason or ""
    parts: list[Markup] = []
    last = 0
    for found in _JOB_ID.finditer(text):
        parts.append(Markup.escape(text[last : found.start()]))
        job_id = found.group(0)
        parts.append(
            Markup('<a href="{}"><code>{}</code></a>').format(
                url_for("admin.job", job_id=job_id), job_id[:8]
            )
        )
        last = found.end()
    parts.append(Markup.escape(text[last:]))
    return Markup("").join(parts)


@bp.post("/workers/<hostname>/clear-flag")
@auth.login_required
def clear_worker_flag(hostname: str) -> Any:
    """Clear a flagged worker's flag (an operator fixed it): it takes jobs again within a
    heartbeat or two. Back to the workers page with what was done."""
    session = get_session()
    cleared = clear_flag(session, hostname)
    session.commit()
    if cleared:
        flash(f"The flag of {hostname} is cleared: it takes jobs again at its next beat.", "ok")
    elif session.get(Worker, hostname) is None:
        flash(f"No worker is named {hostname}.", "bad")
    else:
        flash(f"{hostname} was not flagged.", "bad")
    return redirect(url_for("admin.workers"), code=303)


def failures_by_class(since: datetime) -> list[tuple[ErrorClass, int]]:
    """Failed attempts per error class that ended after ``since``, most frequent first."""
    ended = func.coalesce(Attempt.finished_at, Attempt.started_at)
    counts = get_session().execute(
        select(Attempt.error_class, func.count())
        .where(Attempt.outcome == AttemptOutcome.FAILED, ended >= since)
        .group_by(Attempt.error_class)
    )
    merged: dict[ErrorClass, int] = {}
    for error_class, n in counts.all():  # a failure without a class counts as "other"
        key = error_class or ErrorClass.OTHER
        merged[key] = merged.get(key, 0) + int(n)
    return sorted(merged.items(), key=lambda item: (-item[1], item[0].value))
