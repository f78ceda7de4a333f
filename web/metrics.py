"""``GET /metrics``: the farm's state for Prometheus, read from the database.

Open without login, as Prometheus scrapes it; it shows counts, never job contents. Keep it
off the public internet with the reverse proxy if counts are sensitive. Each scrape builds a
fresh :class:`CollectorRegistry` from the database (the source of truth), so every web process
answers the same numbers.

Every scrape costs the same at any size of history: the database keeps the counts of finished
jobs and of attempts in ``metric_counts`` as rows change (triggers, see the migration), and
jobs still waiting or running are counted through the state index.

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

from celery import Celery
from flask import Blueprint, Response, current_app, request
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from svdfarm.catalog import catalog_keys
from svdfarm.counts import DURATION_BUCKETS
from svdfarm.depths import BrokerUnavailable, queue_depths, waiting_jobs
from svdfarm.models import METRIC_LABEL_SEP, Job, MetricCount
from svdfarm.queues import all_queues
from svdfarm.registry import online_workers
from svdfarm.settings import Settings
from svdfarm.states import JobState
from web.database import get_session

bp = Blueprint("metrics", __name__)


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

    def _counts(self, name: str) -> dict[str, float]:
        """The counts the database's triggers keep under ``name`` (:class:`MetricCount`)."""
        rows = self.session.execute(
            select(MetricCount.labels, MetricCount.value).where(MetricCount.name == name)
        )
        return {labels: value for labels, value in rows.all()}

    def _jobs(self) -> Metric:
        """Jobs per state, zero for states no job is in: the finished ones from the kept
        counts, the few still waiting or running counted through the state index."""
        live = dict(
            self.session.execute(
                select(Job.state, func.count())
                .where(Job.state.in_([s for s in JobState if not s.terminal]))
                .group_by(Job.state)
            ).all()
        )
        kept = self._counts("jobs")
        family = GaugeMetricFamily("svdfarm_jobs", "Jobs in each state.", labels=["state"])
        for state in JobState:
            count = kept.get(state.value, 0) if state.terminal else live.get(state, 0)
            family.add_metric([state.value], int(count))
        return family

    def _attempts(self) -> Metric:
        """Attempts in the database now, by error class, plan and outcome (a gauge)."""
        family = GaugeMetricFamily(
            "svdfarm_attempts",
            "Render attempts in the database by error class (none: no error), dtype plan and "
            "outcome; a gauge: deleting a job removes its attempts.",
            labels=["error_class", "plan", "outcome"],
        )
        for labels, count in sorted(self._counts("attempts").items()):
            if count:
                family.add_metric(labels.split(METRIC_LABEL_SEP), int(count))
        return family

    def _durations(self) -> Metric:
        """The gauge histogram of succeeded jobs' durations, from the kept bucket counts."""
        counts = self._counts("duration_count")
        buckets: list[tuple[str, float]] = []
        below = 0
        for bound in DURATION_BUCKETS:
            below += int(counts.get(str(bound), 0))
            buckets.append((str(float(bound)), below))
        buckets.append(("+Inf", below + int(counts.get("+Inf", 0))))
        return GaugeHistogramMetricFamily(
            "svdfarm_job_duration_seconds",
            "Seconds from a job's start to its finish, for the succeeded jobs in the database; "
            "a gauge histogram: deleting a job removes it.",
            buckets=buckets,
            gsum_value=float(self._counts("duration_sum").get("", 0.0)),
        )

    def _queues(self) -> Iterator[Metric]:
        """Jobs waiting per queue (the database), messages per queue (the broker), and whether
        the broker answered."""
        consumed = {q for w in online_workers(self.session, self.settings) for q in w.queues}
        every = all_queues(catalog_keys(self.settings.catalog))
        waiting = waiting_jobs(self.session, [*every, *sorted(consumed)])
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
