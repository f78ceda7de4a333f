"""The limit the web benchmark sets the status endpoint against: a bare Flask app with one
endpoint that reads one job by its primary key, served by gunicorn exactly as ``svdfarm web``
serves the farm (the same processes x threads, worker class, access log: ``gunicorn_options``).

    .venv/bin/python -m bench.bare_web --port 8001 [--threads 4]

It reads ``SVDFARM_DATABASE_URL`` (and ``SVDFARM_WEB_WORKERS``/``THREADS``) the way the farm
does. The endpoint is what a minimal Flask + SQLAlchemy app does per request: a connection
from the pool, one ``SELECT`` by primary key in its own transaction, a small JSON answer.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from typing import Any

from flask import Flask, abort, jsonify
from sqlalchemy import create_engine, text

#: The one endpoint: ``GET /bare/jobs/<id>``.
BARE_PATH = "/bare/jobs/"


def create_app(database_url: str) -> Flask:
    """The bare app: ``GET /bare/jobs/<id>`` answers the job's id and state as JSON."""
    # The farm's pool size, without its check of each connection at checkout: the limit.
    engine = create_engine(database_url, pool_size=5, max_overflow=10)
    app = Flask(__name__)

    @app.get(BARE_PATH + "<uuid:job_id>")
    def job(job_id: uuid.UUID) -> Any:
        """One primary-key SELECT, answered as JSON; 404 when there is no such job."""
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT id, state FROM jobs WHERE id = :id"), {"id": job_id}
            ).one_or_none()
        if row is None:
            abort(404)
        return jsonify({"id": str(row.id), "state": row.state})

    return app


def main(argv: list[str] | None = None) -> int:
    """Serve the bare app with ``svdfarm web``'s gunicorn settings until stopped."""
    from gunicorn.app.base import BaseApplication

    from cli.web_server import ServePlan, Server, default_worker_class, gunicorn_options
    from svdfarm.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=0, help="0: SVDFARM_WEB_WORKERS")
    parser.add_argument("--threads", type=int, default=0, help="0: SVDFARM_WEB_THREADS")
    args = parser.parse_args(argv)
    settings = load_settings()
    plan = ServePlan(
        server=Server.GUNICORN,
        host=args.host,
        port=args.port,
        workers=args.workers or settings.web_workers,
        threads=args.threads or settings.web_threads,
        worker_class=default_worker_class(),
    )

    class BareApplication(BaseApplication):  # type: ignore[misc]
        """gunicorn serving the bare app with ``svdfarm web``'s options."""

        def load_config(self) -> None:
            """``svdfarm web``'s options, under another process name."""
            options = {**gunicorn_options(plan), "proc_name": "svdfarm-bare-web"}
            for key, value in options.items():
                if key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self) -> Any:
            """Build the app in each worker process, after the fork."""
            return create_app(settings.database_url)

    print(plan.describe().replace("svdfarm web", "bare web"), flush=True)
    BareApplication(prog="bare web").run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
