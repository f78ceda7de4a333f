"""The admin's webhooks page under ``/admin/webhooks``: the registered endpoints (enable,
disable) and the delivery log (filtered by state and endpoint, a page at a time from its
edge), with a button that sends a delivery again.

Every page needs the admin login and every POST its CSRF token (web/auth.py), as on the other
admin pages. Changes go through :mod:`svdfarm.webhooks`, as ``svdfarm webhooks`` does; nothing
is sent from here: a redelivery is made due, and the workers' sender loop sends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from sqlalchemy import Select, select

from svdfarm.models import WebhookDelivery, WebhookEndpoint, utcnow
from svdfarm.webhook_states import DeliveryState
from svdfarm.webhooks import (
    WebhookError,
    disable_endpoint,
    enable_endpoint,
    list_endpoints,
    redeliver,
)
from web import auth
from web.admin import format_seconds, template_helpers
from web.database import get_session

bp = Blueprint("admin_webhooks", __name__, url_prefix="/admin/webhooks")
PAGE_SIZE = 50
#: Why an endpoint the admin disabled gets nothing (shown beside it, as a 410's reason is).
DISABLED_BY_ADMIN = "disabled by an admin"


bp.before_request(auth.admin_guard)


bp.context_processor(template_helpers)


@bp.app_template_global("webhook_due")
def format_due(moment: datetime | None, now: datetime | None = None) -> str:
    """When a pending delivery's next try comes: ``in 4.9 s``, or ``now`` once it is due
    (a template global: a job's admin page shows its deliveries too)."""
    if moment is None:
        return ""
    left = (moment - (now or utcnow())).total_seconds()
    return f"in {format_seconds(left)}" if left > 0.05 else "now"


@dataclass(frozen=True)
class LogFilters:
    """The delivery log's filters and page edge, read from the query string."""

    state: DeliveryState | None = None
    endpoint: int | None = None
    #: Deliveries older than ``before`` or newer than ``after`` (their ids); neither: the newest.
    before: int | None = None
    after: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> tuple[LogFilters, list[str]]:
        """Parse ``request.args``; returns the filters and a problem per ignored value."""
        problems: list[str] = []
        raw_state = args.get("state", "").strip()
        state = None
        if raw_state:
            try:
                state = DeliveryState(raw_state)
            except ValueError:
                known = ", ".join(s.value for s in DeliveryState)
                problems.append(f"Unknown state {raw_state[:40]!r} (one of {known}): ignored.")
        numbers: dict[str, int | None] = {}
        for name in ("endpoint_id", "before", "after"):
            raw = args.get(name, "").strip()
            numbers[name] = None
            if raw:
                try:
                    numbers[name] = int(raw)
                except ValueError:
                    problems.append(f"{name} {raw[:40]!r} is not a number: ignored.")
        if numbers["before"] is not None:
            numbers["after"] = None
        found = cls(state, numbers["endpoint_id"], numbers["before"], numbers["after"])
        return found, problems

    def args(self, **changes: Any) -> dict[str, Any]:
        """The filters as query arguments (blank ones left out), with ``changes`` applied."""
        values: dict[str, Any] = {
            "state": self.state.value if self.state else "",
            "endpoint_id": self.endpoint,
            "before": self.before,
            "after": self.after,
        }
        values.update(changes)
        return {k: v for k, v in values.items() if v not in ("", None)}


def delivery_log(filters: LogFilters) -> Select[WebhookDelivery]:
    """The deliveries matching ``filters`` from the page's edge: newest first (older than
    ``before``), or oldest first when newer than ``after``. Read from an index in that order
    (``ix_webhook_deliveries_state_id``, ``..._endpoint_id_id``, the key), never an OFFSET."""
    stmt = select(WebhookDelivery)
    if filters.state is not None:
        stmt = stmt.where(WebhookDelivery.state == filters.state)
    if filters.endpoint is not None:
        stmt = stmt.where(WebhookDelivery.endpoint_id == filters.endpoint)
    if filters.after is not None:
        return stmt.where(WebhookDelivery.id > filters.after).order_by(WebhookDelivery.id)
    if filters.before is not None:
        stmt = stmt.where(WebhookDelivery.id < filters.before)
    return stmt.order_by(WebhookDelivery.id.desc())


@bp.get("/")
@auth.login_required
def index() -> Any:
    """The endpoints, and the deliveries (filtered) a page at a time, newest first."""
    session = get_session()
    filters, problems = LogFilters.from_args(request.args)
    rows = list(session.scalars(delivery_log(filters).limit(PAGE_SIZE + 1)))
    more = len(rows) > PAGE_SIZE
    rows = rows[:PAGE_SIZE]
    if filters.after is not None:  # read oldest first from the edge: shown newest first
        rows.reverse()
    newer = older = None
    if rows and (filters.before is not None or (filters.after is not None and more)):
        newer = filters.args(before=None, after=rows[0].id)
    if rows and (more or filters.after is not None):
        older = filters.args(after=None, before=rows[-1].id)
    paging = filters.before is not None or filters.after is not None
    return render_template(
        "admin/webhooks.html",
        endpoints=list_endpoints(session),
        deliveries=rows,
        filters=filters,
        problems=problems,
        states=list(DeliveryState),
        newest=filters.args(before=None, after=None) if paging else None,
        newer=newer,
        older=older,
        back_to=request.full_path.rstrip("?"),
    )


def _back() -> Any:
    """Back to the page the form was on (inside the admin), else the webhooks page."""
    target = auth.safe_next(request.form.get("next"), url_for("admin_webhooks.index"))
    return redirect(target, code=303)


@bp.post("/deliveries/<int:delivery_id>/redeliver")
@auth.login_required
def redeliver_one(delivery_id: int) -> Any:
    """Send a delivery again now, with the same ``webhook-id``: the workers' sender takes it
    within a second or two (svdfarm.webhooks.redeliver)."""
    session = get_session()
    try:
        row = redeliver(session, delivery_id)
    except WebhookError as exc:
        session.rollback()
        if session.get(WebhookDelivery, delivery_id) is None:
            abort(404, description=str(exc))
        flash(f"Not redelivered: {exc}", "bad")
        return _back()
    session.commit()
    flash(
        f"Delivery {row.msg_id} ({row.event_type.value}) is due again: the workers send it "
        "within seconds, with the same webhook-id.",
        "ok",
    )
    return _back()


def _endpoint(endpoint_id: int) -> WebhookEndpoint:
    """The endpoint with this id, or 404."""
    row = get_session().get(WebhookEndpoint, endpoint_id)
    if row is None:
        abort(404, description=f"No webhook endpoint {endpoint_id}.")
    return row


@bp.post("/endpoints/<int:endpoint_id>/disable")
@auth.login_required
def disable(endpoint_id: int) -> Any:
    """Stop sending to an endpoint: its pending deliveries are canceled, its owner's later
    events make none for it."""
    session = get_session()
    row = _endpoint(endpoint_id)
    disable_endpoint(session, row.id, reason=DISABLED_BY_ADMIN)
    session.commit()
    flash(f"Endpoint {row.id} ({row.url[:80]}) is disabled; its pending deliveries canceled.", "ok")
    return _back()


@bp.post("/endpoints/<int:endpoint_id>/enable")
@auth.login_required
def enable(endpoint_id: int) -> Any:
    """Send to a disabled endpoint again, from its owner's next event on."""
    session = get_session()
    row = enable_endpoint(session, _endpoint(endpoint_id).id)
    session.commit()
    flash(f"Endpoint {row.id} ({row.url[:80]}) is enabled.", "ok")
    return _back()
