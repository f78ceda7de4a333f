"""The web side's database session: one per request, closed when the request ends."""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from svdfarm.db import Database
from svdfarm.settings import Settings


def init_app(app: Flask, settings: Settings) -> None:
    """Attach a :class:`Database` for the settings' URL and close sessions after requests."""
    app.extensions["svdfarm.db"] = Database(settings.database_url)
    app.teardown_appcontext(_close_session)


def get_db() -> Database:
    """The app's :class:`Database`."""
    database: Database = current_app.extensions["svdfarm.db"]
    return database


def get_session() -> Session:
    """This request's session, opened on first use."""
    if "db_session" not in g:
        g.db_session = get_db().session()
    session: Session = g.db_session
    return session


def _close_session(_exc: BaseException | None = None) -> None:
    """Close the request's session, if one was opened."""
    session = g.pop("db_session", None)
    if session is not None:
        session.close()
