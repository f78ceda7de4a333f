"""History: every page and endpoint on an empty database, then with 1,000,000 jobs.

    .venv/bin/python -m bench.history [--jobs 1000000] [--repeat 15] [--write]

A scratch PostgreSQL database and Redis, ``svdfarm web`` (gunicorn) and no worker. Each request
is timed alone (one client, sequential, ``--repeat`` times after two warm-ups) on the empty
farm, then the fixture fills the database in one pass of ``INSERT ... SELECT`` from
``generate_series`` (2% failed with two attempts, 0.2% canceled, the rest succeeded with one
attempt; four events a job), ``ANALYZE`` runs, and the same requests are timed again. The
target (issue: "flat in history"): each within 1.5x its empty time and under 100 ms.
"""

from __future__ import annotations

import argparse
import functools
import http.cookiejar
import re
import shutil
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Table, literal, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bench.common import (
    BENCHMARKS_MD,
    Farm,
    JobParams,
    fmt_ms,
    markdown_table,
    multipart,
    png_bytes,
    scratch_broker,
    scratch_database,
    section,
    submit,
    write_section,
)

ADMIN_PASSWORD = "bench-admin-password"
SLOWEST_OK_S = 0.100
FLAT_RATIO = 1.5
FILL_TARGET_S = 120.0

#: The jobs of this fill among those already there (by their number, kept in the seed).
NEW_ROWS = "j.seed BETWEEN CAST(:first AS bigint) AND CAST(:last AS bigint)"
#: Column values for the fixture's rows, as SQL over ``g`` (the series) and ``j`` (a job row);
#: the other columns take their scalar default or NULL (see :func:`insert_columns`).
JOB_VALUES = {
    "id": "md5('bench-job-' || g)::uuid",
    "state": (
        "CASE WHEN g % 50 = 0 THEN 'failed' WHEN g % 500 = 1 THEN 'canceled' ELSE 'succeeded' END"
    ),
    "created_at": "now() - make_interval(secs => (CAST(:total AS bigint) - g) * 7.0 + 300)",
    "updated_at": "now() - make_interval(secs => (CAST(:total AS bigint) - g) * 7.0 + 200)",
    "started_at": "now() - make_interval(secs => (CAST(:total AS bigint) - g) * 7.0 + 290)",
    "finished_at": "now() - make_interval(secs => (CAST(:total AS bigint) - g) * 7.0 + 200)",
    "model": "'tiny'",
    "num_frames": "4",
    "num_inference_steps": "2",
    "fps": "7",
    "motion_bucket_id": "127",
    "noise_aug_strength": "0.02",
    "seed": "g",
    "decode_chunk_size": "4",
    "width": "64",
    "height": "64",
    "precision": "'auto'",
    "queue": "'svdfarm.tiny'",
    "input_key": "'jobs/' || md5('bench-job-' || g)::uuid || '/input.png'",
    "input_filename": "'picture-' || g || '.png'",
    "phase": "'done'",
    "progress": "1.0",
    "error": "CASE WHEN g % 50 = 0 THEN 'CUDA out of memory. Tried to allocate 2.00 GiB' END",
    "client": "'10.0.' || (g % 200) || '.' || (g % 250)",
}
ATTEMPT_VALUES = {
    "job_id": "j.id",
    "number": "a.n",
    "worker": "'worker' || (abs(hashtext(j.id::text)) % 8) || '@bench'",
    "plan_name": "CASE WHEN a.n = 1 THEN 'bf16' ELSE 'fp32' END",
    "plan": "'{}'::json",
    "started_at": "j.started_at",
    "finished_at": "j.finished_at",
    "outcome": "CASE WHEN j.state = 'failed' THEN 'failed' ELSE 'succeeded' END",
    "error_class": "CASE WHEN j.state = 'failed' THEN 'out_of_memory' END",
    "message": "CASE WHEN j.state = 'failed' THEN j.error END",
    "duration_s": "90.0",
}
EVENT_VALUES = {
    "job_id": "j.id",
    "type": "e.type",
    "at": "j.created_at + make_interval(secs => e.k)",
    "actor_kind": "e.actor",
    "actor": "''",
    "details": "'{}'::json",
}


def insert_columns(table: Table, values: dict[str, str]) -> tuple[str, str]:
    """The column list and the SELECT list that fill every NOT NULL column of ``table``:
    ``values`` where given, else the column's scalar default; nullable ones stay NULL."""
    names: list[str] = []
    exprs: list[str] = []
    for column in table.columns:
        expr = values.get(column.name) or _default_sql(column)
        if expr is None:
            continue
        names.append(column.name)
        exprs.append(expr)
    return ", ".join(names), ", ".join(exprs)


def _default_sql(column: Column[Any]) -> str | None:
    """The SQL literal of ``column``'s scalar default, None for a nullable column without
    one or an autoincrement key; raises for a NOT NULL column the fixture cannot fill."""
    default = column.default
    if default is not None and getattr(default, "is_scalar", False):
        value = default.arg  # type: ignore[attr-defined]
        value = getattr(value, "value", value)
        compiled = literal(value).compile(compile_kwargs={"literal_binds": True})
        return str(compiled)
    if column.nullable or column.autoincrement is True or column.primary_key:
        return None
    raise RuntimeError(f"the history fixture has no value for {column.table.name}.{column.name}")


def fill(engine: Engine, jobs: int, first: int = 1, total: int = 0) -> float:
    """Insert ``jobs`` jobs numbered from ``first`` with their attempts and events, job ``g``
    ``(total - g) * 7`` seconds old (``total``: default the last one's number, so the newest
    is the last); the seconds it took."""
    last = first + jobs - 1
    numbers = {"first": first, "last": last, "total": total or last}
    from svdfarm.counts import recount
    from svdfarm.models import Attempt, Job, JobEvent

    started = time.perf_counter()
    job_cols, job_exprs = insert_columns(Job.__table__, JOB_VALUES)  # type: ignore[arg-type]
    att_cols, att_exprs = insert_columns(Attempt.__table__, ATTEMPT_VALUES)  # type: ignore[arg-type]
    ev_cols, ev_exprs = insert_columns(JobEvent.__table__, EVENT_VALUES)  # type: ignore[arg-type]
    with engine.begin() as conn:
        # A bulk load, as a restore would: the triggers that keep /metrics' counts are off
        # (one upsert per row) and the counts are counted again once at the end; so are the
        # live feed's (one NOTIFY per event, for nobody watching history).
        for table in ("jobs", "attempts", "job_events"):
            conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        conn.execute(
            text(
                f"INSERT INTO jobs ({job_cols}) SELECT {job_exprs} "
                "FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) g"
            ),
            numbers,
        )
        conn.execute(
            text(
                f"INSERT INTO attempts ({att_cols}) SELECT {att_exprs} FROM jobs j "
                "CROSS JOIN LATERAL generate_series(1, CASE WHEN j.state = 'failed' THEN 2 "
                "ELSE 1 END) a(n) "
                f"WHERE j.finished_at IS NOT NULL AND {NEW_ROWS}"
            ),
            numbers,
        )
        conn.execute(
            text(
                f"INSERT INTO job_events ({ev_cols}) SELECT {ev_exprs} FROM jobs j "
                "CROSS JOIN LATERAL (VALUES (0, 'submitted', 'api'), (1, 'published', 'api'), "
                "(2, 'claimed', 'worker'), (90, CASE j.state WHEN 'failed' THEN 'failed' "
                "WHEN 'canceled' THEN 'canceled' ELSE 'succeeded' END, 'worker')) "
                "e(k, type, actor) "
                f"WHERE j.finished_at IS NOT NULL AND {NEW_ROWS}"
            ),
            numbers,
        )
        for table in ("jobs", "attempts", "job_events"):
            conn.execute(text(f"ALTER TABLE {table} ENABLE TRIGGER USER"))
        recount(Session(bind=conn))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs, attempts, job_events, metric_counts"))
    return time.perf_counter() - started


class Client:
    """One sequential HTTP client with cookies: the admin session and the "My jobs" list."""

    def __init__(self, base: str) -> None:
        """Talk to the farm at ``base``."""
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        )

    def get(self, path: str) -> bytes:
        """GET ``path``; raises unless it answers 200."""
        with self.opener.open(self.base + path, timeout=30) as response:
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status}")
            body: bytes = response.read()
            return body

    def post(self, path: str, body: bytes, content_type: str) -> bytes:
        """POST ``body`` to ``path``; the answer's body."""
        request = urllib.request.Request(
            self.base + path, data=body, headers={"Content-Type": content_type}, method="POST"
        )
        with self.opener.open(request, timeout=30) as response:
            answer: bytes = response.read()
            return answer

    def log_in(self) -> None:
        """Log in as the admin (the login form with its CSRF token)."""
        page = self.get("/admin/login").decode()
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token, "no CSRF token on the login page"
        form = urllib.parse.urlencode({"csrf_token": token[1], "password": ADMIN_PASSWORD})
        self.post("/admin/login", form.encode(), "application/x-www-form-urlencoded")
        self.get("/admin/")


def requests(
    client: Client, job_id: str, submit_body: tuple[bytes, str]
) -> dict[str, Callable[[], Any]]:
    """What is timed, by name: each page and endpoint a user or Prometheus asks for."""
    body, content_type = submit_body
    gets = {
        "GET /api/v1/jobs/<id>": f"/api/v1/jobs/{job_id}",
        "GET /jobs/<id> (status page)": f"/jobs/{job_id}",
        "GET /api/v1/jobs/<id>/events": f"/api/v1/jobs/{job_id}/events",
        "GET / (form)": "/",
        "GET /jobs (My jobs)": "/jobs",
        "GET /admin/ (failed)": "/admin/",
        "GET /admin/?state=any": "/admin/?state=any",
        "GET /admin/?error_class=out_of_memory": "/admin/?error_class=out_of_memory",
        "GET /admin/?worker=worker3@bench": "/admin/?worker=worker3%40bench",
        "GET /admin/?model=tiny": "/admin/?model=tiny",
        "GET /admin/?since=<a week ago>": "/admin/?since=" + _days_ago(7),
        "GET /admin/?q=picture-4242": "/admin/?q=picture-4242",
        "GET /admin/ older page (3 days back)": "/admin/?before=" + _cursor_days_ago(3),
        "GET /admin/jobs/<id>": f"/admin/jobs/{job_id}",
        "GET /admin/workers": "/admin/workers",
        "GET /metrics": "/metrics",
    }
    timed: dict[str, Callable[[], Any]] = {
        name: functools.partial(client.get, path) for name, path in gets.items()
    }
    timed["POST /api/v1/jobs (submit)"] = lambda: client.post("/api/v1/jobs", body, content_type)
    return timed


def _cursor_days_ago(days: int) -> str:
    """An admin list page mark ``days`` back (the "older" link's argument)."""
    from datetime import datetime, timedelta, timezone

    from web.admin import format_cursor

    moment = datetime.now(timezone.utc) - timedelta(days=days)
    return format_cursor((moment, uuid.UUID(int=(1 << 128) - 1)))


def _days_ago(days: int) -> str:
    """The date ``days`` ago, as the admin's filter takes it."""
    from datetime import date, timedelta

    return (date.today() - timedelta(days=days)).isoformat()


def time_all(timed: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """The median seconds of each request, after two warm-ups."""
    medians: dict[str, float] = {}
    for name, call in timed.items():
        for _ in range(2):
            call()
        samples = []
        for _ in range(repeat):
            started = time.perf_counter()
            call()
            samples.append(time.perf_counter() - started)
        medians[name] = statistics.median(samples)
        print(f"  {name}: {fmt_ms(medians[name])}", flush=True)
    return medians


SMALL = 1_000


def time_passes(farm: Farm, repeat: int) -> dict[str, float]:
    """The median seconds of the background passes over the farm's database: the reaper's
    whole pass (lost workers, storage retries, republishing what the broker lost) and the
    retention sweep alone, with a retention longer than the history (nothing is due: the
    cost is finding that out)."""
    from svdfarm.celery_app import create_celery
    from svdfarm.db import Database
    from svdfarm.lifecycle import By
    from svdfarm.reaper import reap
    from svdfarm.retention import sweep
    from svdfarm.settings import load_settings
    from svdfarm.states import Actor

    settings = load_settings({**farm.env(), "SVDFARM_RETENTION": "3650d"})
    db = Database(settings.database_url)
    celery = create_celery(settings)
    passes: dict[str, Callable[[], Any]] = {
        "reaper pass (svdfarm reap)": lambda: reap(db, settings, celery, name="bench"),
        "retention sweep": lambda: sweep(db, settings, by=By(Actor.REAPER, "bench")),
    }
    try:
        return time_all(passes, repeat)
    finally:
        celery.close()
        db.dispose()


def main(argv: list[str] | None = None) -> int:
    """Time every request empty and full, and the background passes at 1,000 jobs and full;
    print the tables; optionally write them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--doc", type=Path, default=BENCHMARKS_MD, help="the file --write updates")
    args = parser.parse_args(argv)
    params = JobParams()
    image = png_bytes(params.size, params.size)
    data_dir = Path(tempfile.mkdtemp(prefix="svdfarm-bench-"))
    try:
        with (
            scratch_database("postgresql", data_dir) as database_url,
            scratch_broker("redis") as broker_url,
            Farm(
                database_url,
                broker_url,
                data_dir / "farm",
                worker=False,
                extra_env={"SVDFARM_ADMIN_PASSWORD": ADMIN_PASSWORD},
            ) as farm,
        ):
            client = Client(farm.base)
            client.log_in()
            job_id = submit(farm.base, params, image)
            client.get(f"/jobs/{job_id}")  # onto this client's "My jobs"
            timed = requests(client, job_id, multipart(params.fields(), image))
            print("empty database:", flush=True)
            empty = time_all(timed, args.repeat)
            engine = farm.engine()
            try:
                # The newest SMALL jobs first, for the passes' anchor; then the older rest.
                fill(engine, SMALL, first=args.jobs - SMALL + 1)
                print(f"{SMALL:,} jobs:", flush=True)
                small = time_all(timed, args.repeat)
                small_passes = time_passes(farm, args.repeat)
                fill_s = fill(engine, args.jobs - SMALL, total=args.jobs)
                with engine.connect() as conn:
                    rows = {
                        table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                        for table in ("jobs", "attempts", "job_events")
                    }
            finally:
                engine.dispose()
            print(f"filled in {fill_s:.1f} s: {rows}", flush=True)
            print(f"{args.jobs:,} jobs:", flush=True)
            full = time_all(timed, args.repeat)
            full_passes = time_passes(farm, args.repeat)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    pages = comparison(empty, full, "empty", f"{args.jobs:,} jobs", SLOWEST_OK_S, small)
    passes = comparison(small_passes, full_passes, f"{SMALL:,} jobs", f"{args.jobs:,} jobs")
    notes = (
        f"Median of {args.repeat} sequential requests (one client), `svdfarm web` on PostgreSQL "
        f"and Redis, no worker. The fixture: {rows['jobs']:,} jobs, {rows['attempts']:,} "
        f"attempts, {rows['job_events']:,} events; the {args.jobs - SMALL:,} older jobs "
        f"inserted, counted and analysed in {fill_s:.1f} s (target {FILL_TARGET_S:.0f} s). "
        f"The passes (second table) run in the benchmark's process, {args.repeat} times each, "
        f"first with the newest {SMALL:,} jobs only, then with them all."
    )
    print(pages, passes, notes, sep="\n\n")
    if args.write:
        body = section(f"History: every page at {args.jobs:,} jobs", pages, notes)
        write_section("history", body + "\n\n" + passes, args.doc)
    return 0


def comparison(
    before: dict[str, float],
    after: dict[str, float],
    small: str,
    large: str,
    limit: float = 0,
    between: dict[str, float] | None = None,
) -> str:
    """A table of each timing before and after, the ratio, and whether it is flat (at most
    1.5x, and under ``limit`` when given); with ``between`` (the pages at 1,000 jobs, where
    a list shows a full page, as it does at the end and not on an empty database) a column
    of it and the ratio against it too."""
    rows = []
    for name, was in before.items():
        now = after[name]
        met = now / was <= FLAT_RATIO and (not limit or now < limit)
        row = [name, fmt_ms(was), fmt_ms(now), f"{now / was:.2f}x", "yes" if met else "no"]
        if between is not None:
            row[2:2] = [fmt_ms(between[name])]
            row.insert(5, f"{now / between[name]:.2f}x")
        rows.append(row)
    target = f"<= {FLAT_RATIO}x" + (f" and < {limit * 1000:.0f} ms" if limit else "")
    headers = ["request", small, large, "ratio", target]
    if between is not None:
        headers = ["request", small, f"{SMALL:,} jobs", large, "ratio", f"vs {SMALL:,}", target]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    raise SystemExit(main())
