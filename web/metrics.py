"""``GET /metrics``: the farm's state for Prometheus, read from the database.

Open without login, as Prometheus scrapes it; it shows counts, never job contents. Keep it
off the public internet with the reverse proxy if counts are sensitive. Each scrape builds a
fresh :class:`CollectorRegistry` from the database (the source of truth), so every web process
answers the same numbers.

Everything here is a gauge: it counts the rows in the database now, and rows go away (a job is
deleted with its attempts) or change (a running attempt gets its error class), so a count can
fall. A Prometheus counter (``_total``) must never fall (a fall reads as a counter reset and
``rate()`` invents a burst), so none is exported:

- ``svdfarm_jobs{state}``: jobs in each state;
- ``svdfarm_attempts{error_class,plan,outcome}``: attempts in the database by error class
  (``none`` for those without one), plan name and outcome (``running`` while one runs);
- ``svdfarm_job_duration_seconds``: a gauge histogram (OpenMetrics ``gaugehistogram``:
  ``_bucket``, ``_gcount``, ``_gsum``) of the succeeded jobs' finished - started;
- ``svdfarm_queue_depth{queue}``: jobs waiting in each queue (queued in the database);
- ``svdfarm_queue_messages{queue}``: messages the broker holds in each queue, those of jobs
  canceled while queued included (workers drop them), and ``svdfarm_broker_up``;
- ``svdfarm_workers_online``: workers whose heartbeat is recent.

The answer is OpenMetrics when the scraper asks for it (Prometheus does), else the classic text
format, which has no gauge histogram and calls it a histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from celery import Celery
from flask import Blueprint, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from svdfarm.depths import BrokerUnavailable, queue_depths, waiting_jobs
from svdfarm.models import Attempt, Job
from svdfarm.queues import all_queues
from svdfarm.registry import online_workers
from svdfarm.settings import Settings
from svdfarm.states import JobState
from web.database import get_session

bp = Blueprint("metrics", __name__)

#: Upper bounds of the job duration buckets, in seconds: seconds on the tiny model on CPU,
#: minutes on a GPU, hours at the time limit.
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800)


def duration_seconds(session: Session) -> ColumnElement[Any]:
    """``finished_at - started_at`` of a job in seconds, in the session's SQL dialect."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite stores timestamps as text; julianday() reads them (fractional days).
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return func.extract("epoch", Job.finished_at - Job.started_at)


class FarmCollector(Collector):
    """Collects the farm's metrics from one database session at scrape time."""

    def __init__(self, session: Session, settings: Settings, celery: Celery | None = None) -> None:
        """Read through ``session`` with ``settings``; count queues through ``celery``'s broker."""
        self.session = session
        self.settings = settings
        self.celery = celery

    def collect(self) -> Iterator[Metric]:
        """Every metric family, as Prometheus' client library expects of a collector."""
        yield self._jobs()
        yield self._attempts()
        yield self._durations()
        yield from self._queues()
        workers = GaugeMetricFamily("svdfarm_workers_online", "Workers with a recent heartbeat.")
        workers.add_metric([], len(online_workers(self.session, self.settings)))
        yield workers

    def _jobs(self) -> Metric:
        """Jobs per state, zero for states no job is in."""
        counts = dict(
            self.session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
        )
        family = GaugeMetricFamily("svdfarm_jobs", "Jobs in each state.", labels=["state"])
        for state in JobState:
            family.add_metric([state.value], counts.get(state, 0))
        return family

    def _attempts(self) -> Metric:
        """Attempts in the database now, by error class, plan and outcome (a gauge)."""
        rows = self.session.execute(
            select(Attempt.error_class, Attempt.plan_name, Attempt.outcome, func.count()).group_by(
                Attempt.error_class, Attempt.plan_name, Attempt.outcome
            )
        ).all()
        family = GaugeMetricFamily(
            "svdfarm_attempts",
            "Render attempts in the database by error class (none: no error), dtype plan and "
            "outcome; a gauge: deleting a job removes its attempts.",
            labels=["error_class", "plan", "outcome"],
        )
        for error_class, plan, outcome, count in rows:
            labels = [error_class.value if error_class else "none", plan, outcome.value]
            family.add_metric(labels, count)
        return family

    def _durations(self) -> Metric:
        """The gauge histogram of succeeded jobs' durations, counted by the database."""
        seconds = duration_seconds(self.session)
        columns: list[Any] = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
        columns += [
            func.coalesce(func.sum(case((seconds <= b, 1), else_=0)), 0) for b in DURATION_BUCKETS
        ]
        row = self.session.execute(
            select(*columns).where(
                Job.state == JobState.SUCCEEDED,
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
        ).one()
        total, total_seconds, *cumulative = row
        pairs = zip(DURATION_BUCKETS, cumulative, strict=True)
        buckets = [(str(float(bound)), int(n)) for bound, n in pairs]
        buckets.append(("+Inf", int(total)))
        return GaugeHistogramMetricFamily(
            "svdfarm_job_duration_seconds",
            "Seconds from a job's start to its finish, for the succeeded jobs in the database; "
            "a gauge histogram: deleting a job removes it.",
            buckets=buckets,
            gsum_value=float(total_seconds),
        )

    def _queues(self) -> Iterator[Metric]:
        """Jobs waiting per queue (the database), messages per queue (the broker), and whether
        the broker answered."""
        consumed = {q for w in online_workers(self.session, self.settings) for q in w.queues}
        waiting = waiting_jobs(self.session, [*all_queues(), *sorted(consumed)])
        family = GaugeMetricFamily(
            "svdfarm_queue_depth",
            "Jobs waiting in each queue: queued in the database.",
            labels=["queue"],
        )
        for queue, count in waiting.items():
            family.add_metric([queue], count)
        yield family
        up = GaugeMetricFamily("svdfarm_broker_up", "1 when the broker answered this scrape.")
        try:
            messages = queue_depths(self.settings, waiting, celery=self.celery)
        except BrokerUnavailable:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        held = GaugeMetricFamily(
            "svdfarm_queue_messages",
            "Messages the broker holds in each queue, those of jobs canceled while queued "
            "included (workers drop them).",
            labels=["queue"],
        )
        for queue, count in messages.items():
            held.add_metric([queue], count)
        yield held


@bp.get("/metrics")
def metrics() -> Response:
    """The Prometheus exposition of :class:`FarmCollector`; no login (see the module doc)."""
    registry = CollectorRegistry(auto_describe=False)
    settings = current_app.config["SVDFARM_SETTINGS"]
    registry.register(FarmCollector(get_session(), settings, current_app.extensions["celery"]))
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})
