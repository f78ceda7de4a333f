"""The counts ``/metrics`` reads (:class:`~svdfarm.models.MetricCount`), counted again from
every row.

The database keeps them itself as rows change (triggers: the ``metric_counts`` migration), so
this is needed only where rows changed with the triggers off: a bulk load, a restore, a
``TRUNCATE``. ``svdfarm db recount`` runs it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, String, case, cast, delete, func, insert, literal, select
from sqlalchemy.orm import Session

from svdfarm.models import METRIC_LABEL_SEP, Attempt, Job, MetricCount
from svdfarm.states import JobState

#: Upper bounds of the job duration buckets, in seconds: seconds on the tiny model on CPU,
#: minutes on a GPU, hours at the time limit. The ``metric_counts`` migration froze a copy.
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800)


def duration_seconds(session: Session) -> ColumnElement[Any]:
    """``finished_at - started_at`` of a job in seconds, in the session's SQL dialect."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite stores timestamps as text; julianday() reads them (fractional days).
        return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    return func.extract("epoch", Job.finished_at - Job.started_at)


def recount(session: Session) -> None:
    """Replace every kept count with a count of the rows now (in the session's transaction)."""
    finished = JobState.terminal_states()
    seconds = duration_seconds(session)
    bucket = case(
        *((seconds <= bound, literal(str(bound))) for bound in DURATION_BUCKETS),
        else_=literal("+Inf"),
    )
    ran = (
        Job.state == JobState.SUCCEEDED,
        Job.started_at.is_not(None),
        Job.finished_at.is_not(None),
    )
    sep = literal(METRIC_LABEL_SEP)
    error_class = func.coalesce(cast(Attempt.error_class, String), "none")
    labels = error_class.concat(sep).concat(Attempt.plan_name).concat(sep)
    labels = labels.concat(cast(Attempt.outcome, String))
    session.execute(delete(MetricCount))
    rows: list[tuple[str, Any, Any]] = []
    for state, n in session.execute(
        select(Job.state, func.count()).where(Job.state.in_(finished)).group_by(Job.state)
    ):
        rows.append(("jobs", state.value, n))
    for name, n in session.execute(select(bucket, func.count()).where(*ran).group_by(bucket)):
        rows.append(("duration_count", name, n))
    total = session.scalar(select(func.coalesce(func.sum(seconds), 0.0)).where(*ran))
    rows.append(("duration_sum", "", total))
    for name, n in session.execute(select(labels, func.count()).group_by(labels)):
        rows.append(("attempts", name, n))
    if rows:
        session.execute(
            insert(MetricCount),
            [{"name": name, "labels": key, "value": float(n)} for name, key, n in rows],
        )
