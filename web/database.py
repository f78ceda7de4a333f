"""The web side's database session: one per request, closed when the request ends.

When the database cannot be reached (down, restarting, a SQLite file locked for too long),
every request answers 503 with ``Retry-After`` instead of a 500, and the next request after
it is back simply works: the pool checks connections before using them.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, current_app, g, has_request_context, render_template_string, request
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from svdfarm.db import Database, is_unavailable
from svdfarm.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    """Attach a :class:`Database` for the settings' URL (a pool of ``SVDFARM_WEB_DB_POOL``
    connections) and close sessions after requests."""
    app.extensions["svdfarm.db"] = Database(settings.database_url, pool_size=settings.web_db_pool)
    app.teardown_appcontext(_close_session)
    app.register_error_handler(sa_exc.DBAPIError, _database_error)
    app.register_error_handler(sa_exc.TimeoutError, _database_error)


def get_db() -> Database:
    """The app's :class:`Database`."""
    database: Database = current_app.extensions["svdfarm.db"]
    return database


#: The methods that only read: their requests get a session without a transaction.
READ_METHODS = frozenset({"GET", "HEAD"})


def get_session() -> Session:
    """This request's session, opened on first use: outside a transaction for a GET or HEAD,
    which only read (:meth:`Database.read_session`: two round trips fewer)."""
    if "db_session" not in g:
        reads = has_request_context() and request.method in READ_METHODS
        g.db_session = get_db().read_session() if reads else get_db().session()
    session: Session = g.db_session
    return session


def release_session() -> None:
    """Close this request's session now, giving its connection back: a long response (an
    event stream) that reads nothing more holds no connection while it lasts."""
    _close_session()


def _close_session(_exc: BaseException | None = None) -> None:
    """Close the request's session, if one was opened."""
    session = g.pop("db_session", None)
    if session is not None:
        session.close()


#: Seconds a client is asked to wait when the database is unreachable.
RETRY_AFTER_S = 5
_UNAVAILABLE = "The database is unavailable right now; nothing was lost. Try again shortly."
_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{{ retry }}"><title>Unavailable: svdfarm</title></head>
<body><h1>Temporarily unavailable</h1><p>{{ message }}</p>
<p>This page reloads itself in {{ retry }} seconds.</p></body></html>"""

log = logging.getLogger(__name__)


def _database_error(exc: Exception) -> Any:
    """503 with Retry-After for an unreachable database; anything else stays a 500."""
    if not is_unavailable(exc):
        raise exc
    log.warning("database unavailable: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
    session = g.pop("db_session", None)
    if session is not None:
        try:
            session.close()
        except Exception:  # the connection is gone already
            log.debug("closing the session of a failed request failed", exc_info=True)
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    if request.path.startswith("/api/"):
        return {"error": _UNAVAILABLE}, 503, headers
    html = render_template_string(_PAGE, retry=RETRY_AFTER_S, message=_UNAVAILABLE)
    return html, 503, headers
