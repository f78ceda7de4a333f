"""``/healthz``: is the web process up and can it reach its database?"""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from web.database import get_session

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    """200 when the database answers, 503 with the reason when it does not (406 when the
    request accepts no JSON)."""
    from web.api import not_acceptable

    refused = not_acceptable()
    if refused is not None:
        return refused
    try:
        get_session().execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        body = {"status": "error", "database": f"unreachable: {type(exc).__name__}"}
        return body, 503, {"Retry-After": "5"}
    return {"status": "ok", "database": "ok"}
