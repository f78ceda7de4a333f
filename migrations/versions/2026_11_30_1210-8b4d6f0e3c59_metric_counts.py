"""metric counts: /metrics reads counts kept by the database as rows change, not every row

Revision ID: 8b4d6f0e3c59
Revises: 7a3c5e9d2b48
Create Date: 2026-11-30 12:10:00

Triggers keep ``metric_counts`` true for every write, whoever makes it (the lifecycle, a
delete, a cascade, a script): jobs in each finished state, the duration histogram of the
succeeded ones, and attempts by error class, plan and outcome. Jobs still queued or running
are few and are counted live through the state index. The histogram's bounds are frozen here
(web/metrics.py's ``DURATION_BUCKETS``; a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8b4d6f0e3c59"
down_revision: str | None = "7a3c5e9d2b48"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800)
FINISHED = ("succeeded", "failed", "canceled")
#: Between the labels of one attempt count: error class, plan, outcome.
SEP = "\x1f"


def _bucket(seconds: str) -> str:
    """SQL naming the histogram bucket of ``seconds``: its upper bound, or +Inf."""
    whens = " ".join(f"WHEN {seconds} <= {b} THEN '{b}'" for b in DURATION_BUCKETS)
    return f"CASE {whens} ELSE '+Inf' END"


def _seconds(row: str, dialect: str) -> str:
    """SQL for a job row's run time in seconds."""
    if dialect == "sqlite":
        return f"((julianday({row}.finished_at) - julianday({row}.started_at)) * 86400.0)"
    return f"extract(epoch from {row}.finished_at - {row}.started_at)"


def _attempt_labels(row: str, dialect: str) -> str:
    """SQL for an attempt's labels: error class, plan and outcome, joined by :data:`SEP`."""
    sep = "char(31)" if dialect == "sqlite" else "chr(31)"
    return (
        f"coalesce({row}.error_class, 'none') || {sep} || {row}.plan_name || {sep} || {row}.outcome"
    )


def _add(name: str, labels: str, value: str, where: str = "") -> str:
    """An upsert adding ``value`` to the count ``name``/``labels`` (a SELECT, so it can be
    conditional; SQLite needs the WHERE before ON CONFLICT in any case)."""
    return (
        f"INSERT INTO metric_counts (name, labels, value) SELECT '{name}', {labels}, {value} "
        f"WHERE {where or 'true'} "
        "ON CONFLICT (name, labels) DO UPDATE SET value = metric_counts.value + excluded.value"
    )


def _job_changes(row: str, sign: str, dialect: str) -> list[str]:
    """Statements counting job ``row`` (OLD or NEW) in (+1) or out (-1)."""
    finished = ", ".join(f"'{s}'" for s in FINISHED)
    ran = (
        f"{row}.state = 'succeeded' AND {row}.started_at IS NOT NULL "
        f"AND {row}.finished_at IS NOT NULL"
    )
    seconds = _seconds(row, dialect)
    return [
        _add("jobs", f"{row}.state", sign, f"{row}.state IN ({finished})"),
        _add("duration_count", _bucket(seconds), sign, ran),
        _add("duration_sum", "''", f"{sign} * {seconds}", ran),
    ]


def _attempt_changes(row: str, sign: str, dialect: str) -> list[str]:
    """Statements counting attempt ``row`` in or out."""
    return [_add("attempts", _attempt_labels(row, dialect), sign)]


Changes = Callable[[str, str, str], list[str]]
JOB_WATCHED = ("state", "started_at", "finished_at")
ATTEMPT_WATCHED = ("error_class", "plan_name", "outcome")


def _changed(columns: Sequence[str]) -> str:
    """SQL true when an UPDATE changed any of ``columns``."""
    return " OR ".join(f"OLD.{c} IS DISTINCT FROM NEW.{c}" for c in columns)


def _postgresql(table: str, counts: Changes, watched: Sequence[str]) -> list[str]:
    """A PL/pgSQL trigger function for ``table`` and its three triggers."""
    old = ";\n    ".join(counts("OLD", "-1", "postgresql"))
    new = ";\n    ".join(counts("NEW", "1", "postgresql"))
    function = f"svdfarm_count_{table}"
    return [
        f"""CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') THEN
    {old};
  END IF;
  IF TG_OP IN ('UPDATE', 'INSERT') THEN
    {new};
  END IF;
  RETURN NULL;
END $$""",
        f"CREATE TRIGGER {table}_count_insert AFTER INSERT ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER {table}_count_delete AFTER DELETE ON {table} "
        f"FOR EACH ROW EXECUTE FUNCTION {function}()",
        f"CREATE TRIGGER {table}_count_update AFTER UPDATE OF {', '.join(watched)} ON {table} "
        f"FOR EACH ROW WHEN ({_changed(watched)}) EXECUTE FUNCTION {function}()",
    ]


def _sqlite(table: str, counts: Changes, watched: Sequence[str]) -> list[str]:
    """SQLite triggers for ``table`` (no functions there: the statements in each)."""

    def body(*parts: tuple[str, str]) -> str:
        statements = [s for row, sign in parts for s in counts(row, sign, "sqlite")]
        return "BEGIN " + "; ".join(statements) + "; END"

    changed = _changed(watched).replace("IS DISTINCT FROM", "IS NOT")
    return [
        f"CREATE TRIGGER {table}_count_insert AFTER INSERT ON {table} {body(('NEW', '1'))}",
        f"CREATE TRIGGER {table}_count_delete AFTER DELETE ON {table} {body(('OLD', '-1'))}",
        f"CREATE TRIGGER {table}_count_update AFTER UPDATE OF {', '.join(watched)} ON {table} "
        f"WHEN {changed} {body(('OLD', '-1'), ('NEW', '1'))}",
    ]


def upgrade() -> None:
    """Apply this revision: the table, its triggers, and the counts of the rows already there."""
    op.create_table(
        "metric_counts",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("labels", sa.String(length=500), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", "labels", name=op.f("pk_metric_counts")),
    )
    dialect = op.get_bind().dialect.name
    make = _sqlite if dialect == "sqlite" else _postgresql
    statements = make("jobs", _job_changes, JOB_WATCHED)
    statements += make("attempts", _attempt_changes, ATTEMPT_WATCHED)
    for statement in statements:
        op.execute(statement)
    # The rows already there, counted once.
    finished = ", ".join(f"'{s}'" for s in FINISHED)
    ran = "state = 'succeeded' AND started_at IS NOT NULL AND finished_at IS NOT NULL"
    seconds = _seconds("jobs", dialect)
    for select in (
        f"'jobs', state, count(*) FROM jobs WHERE state IN ({finished}) GROUP BY state",
        f"'duration_count', {_bucket(seconds)}, count(*) FROM jobs WHERE {ran} GROUP BY 2",
        f"'duration_sum', '', coalesce(sum({seconds}), 0) FROM jobs WHERE {ran}",
        f"'attempts', {_attempt_labels('attempts', dialect)}, count(*) FROM attempts GROUP BY 2",
    ):
        op.execute(f"INSERT INTO metric_counts (name, labels, value) SELECT {select}")


def downgrade() -> None:
    """Revert this revision."""
    dialect = op.get_bind().dialect.name
    for table in ("jobs", "attempts"):
        for event in ("insert", "delete", "update"):
            op.execute(
                f"DROP TRIGGER IF EXISTS {table}_count_{event}"
                + ("" if dialect == "sqlite" else f" ON {table}")
            )
        if dialect != "sqlite":
            op.execute(f"DROP FUNCTION IF EXISTS svdfarm_count_{table}()")
    op.drop_table("metric_counts")
