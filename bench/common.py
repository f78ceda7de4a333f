"""What the benchmarks share: scratch databases and Redis, a farm of real processes (the web as
``svdfarm web`` serves it, one ``svdfarm worker``), HTTP helpers, statistics, and the writer of
docs/BENCHMARKS.md.

The benchmarks talk to the farm the way users do (HTTP) and read its figures from the database
it records them in (``jobs.created_at``, ``attempts.started_at``, ``jobs.finished_at``).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from cli.serve import stop_children

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
#: PostgreSQL server for scratch databases (one is created per run and dropped after).
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: Redis database the benchmarks use; it is emptied before and after each run.
DEFAULT_REDIS = "redis://127.0.0.1:6379/5"
#: RabbitMQ the benchmarks use; each run gets a virtual host of its own (``rabbitmqctl``).
DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"
TERMINAL_STATES = ("succeeded", "failed", "canceled")


def pg_server_url() -> str:
    """The PostgreSQL server the benchmarks create their scratch databases on."""
    return os.environ.get("SVDFARM_BENCH_DATABASE_URL", DEFAULT_PG)


def redis_url() -> str:
    """The Redis database the benchmarks use as the broker."""
    return os.environ.get("SVDFARM_BENCH_REDIS_URL", DEFAULT_REDIS)


def amqp_url() -> str:
    """The RabbitMQ the benchmarks use as the broker (a new vhost on it each run)."""
    return os.environ.get("SVDFARM_BENCH_AMQP_URL", DEFAULT_AMQP)


def setup_name(database: str, broker: str) -> str:
    """How a table names a setup: ``PostgreSQL + Redis`` or ``SQLite + embedded broker``."""
    db = "PostgreSQL" if database == "postgresql" else "SQLite"
    queue = {"redis": "Redis", "rabbitmq": "RabbitMQ"}.get(broker, "embedded broker")
    return f"{db} + {queue}"


# --- scratch services -----------------------------------------------------------------------


@contextmanager
def scratch_database(kind: str, data_dir: Path) -> Iterator[str]:
    """An empty database for one run: a new PostgreSQL database (dropped after) or SQLite."""
    if kind == "sqlite":
        yield f"sqlite:///{data_dir / 'svdfarm.db'}"
        return
    if kind != "postgresql":
        raise ValueError(f"database must be postgresql or sqlite, got {kind!r}")
    server = pg_server_url()
    name = f"svdfarm_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield server.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def scratch_broker(kind: str) -> Iterator[str]:
    """The broker URL for one run: the benchmark Redis database, emptied before and after, a
    new RabbitMQ virtual host (deleted after), or the embedded filesystem broker."""
    if kind == "embedded":
        yield "filesystem://"
        return
    if kind == "rabbitmq":
        yield from _scratch_vhost(amqp_url())
        return
    if kind != "redis":
        raise ValueError(f"broker must be redis, rabbitmq or embedded, got {kind!r}")
    import redis

    url = redis_url()
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


def _scratch_vhost(base_url: str) -> Iterator[str]:
    """``base_url`` on a new virtual host, made and deleted with ``rabbitmqctl`` (local node)."""
    vhost = f"svdfarm-bench-{uuid.uuid4().hex[:10]}"
    scheme, rest = base_url.split("://", 1)
    authority = rest.split("/", 1)[0]
    user = authority.rsplit("@", 1)[0].split(":", 1)[0] if "@" in authority else "guest"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    try:
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            check=True,
            capture_output=True,
        )
        yield f"{scheme}://{authority}/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], check=False, capture_output=True)


# --- the farm -------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpus() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0))


def torch_threads() -> int:
    """The torch thread count the benchmarks' workers and bare loop get by default: one per
    CPU but one, which is left to the farm's own processes (web, worker main process, broker,
    database). With every core given to torch, any of them waking up stalls torch's whole
    thread team, and on a shared machine that noise swamps what is being measured."""
    return max(1, cpus() - 1)


def model_cpus() -> set[int]:
    """The CPUs a benchmark gives the model's process (the bare loop, the worker's pool
    process): all but the first, which the farm's own processes get."""
    allowed = sorted(os.sched_getaffinity(0))
    return set(allowed[1:]) or set(allowed)


def farm_cpus() -> set[int]:
    """The CPU the farm's own processes (web, worker main process) get: the first one."""
    return {min(os.sched_getaffinity(0))}


def pin(pid: int, cpu_set: set[int]) -> None:
    """Pin every thread of a process (and so the children they start) to ``cpu_set``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpu_set)
        except (ProcessLookupError, OSError):
            continue  # a thread that just ended


def thread_env(threads: int) -> dict[str, str]:
    """Environment variables that fix torch's (OpenMP's) thread count."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def peak_rss_bytes(pid: int) -> int | None:
    """A live process's peak resident set size (``VmHWM``), or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def child_pids(pid: int) -> list[int]:
    """The ids of a process's direct children."""
    try:
        text_ = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text_.split()]


@dataclass
class Farm:
    """``svdfarm web`` and, unless ``worker`` is False, one ``svdfarm worker``, in a scratch
    data folder, on the given database and broker. Use it as a context manager."""

    database_url: str
    broker_url: str
    data_dir: Path
    threads: int = field(default_factory=torch_threads)
    worker: bool = True
    #: ``svdfarm web``'s server and threads per process; empty and 0: its defaults.
    web_server: str = ""
    web_threads: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    hostname: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:6]}@localhost")
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        """The web's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment of the farm's processes."""
        return {
            **os.environ,
            "SVDFARM_DATA_DIR": str(self.data_dir),
            "SVDFARM_DATABASE_URL": self.database_url,
            "SVDFARM_BROKER_URL": self.broker_url,
            "SVDFARM_MODEL": "tiny",
            # Submit throughput is measured, not the submit limits.
            "SVDFARM_SUBMIT_RATE": "0",
            "SVDFARM_MAX_QUEUED": "0",
            "PYTHONUNBUFFERED": "1",
            **thread_env(self.threads),
            **self.extra_env,
        }

    def _spawn(self, name: str, *argv: str) -> None:
        """Start ``svdfarm ARGV`` with its output in ``<data_dir>/<name>.log``."""
        log = open(self.data_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "cli", *argv],
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )
        finally:
            log.close()

    def log(self, name: str) -> str:
        """What a process of the farm has printed."""
        path = self.data_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> Farm:
        """Migrate, start the processes and wait until the web answers and the worker is idle."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "cli", "db", "upgrade"],
            env=self.env(),
            check=True,
            capture_output=True,
        )
        web = ["--port", str(self.port)]
        web += ["--server", self.web_server] if self.web_server else []
        web += ["--threads", str(self.web_threads)] if self.web_threads else []
        self._spawn("web", "web", *web)
        if self.worker:
            self._spawn("worker", "worker", "--hostname", self.hostname)
        self._wait_ready()
        return self

    def restart_worker(self) -> None:
        """Stop the worker and start a fresh one (a new pool process), and wait until it is
        idle; the web keeps running."""
        stop_children([self.processes.pop("worker")], 60)
        self._spawn("worker", "worker", "--hostname", self.hostname)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 180) -> None:
        """Block until ``/healthz`` answers and the worker registered itself as idle."""
        deadline = time.monotonic() + timeout_s
        engine = self.engine()
        try:
            while time.monotonic() < deadline:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited early:\n{self.log(name)[-4000:]}")
                if self._web_up() and (not self.worker or self._worker_idle(engine)):
                    return
                time.sleep(0.2)
        finally:
            engine.dispose()
        raise RuntimeError(
            f"the farm did not start in {timeout_s:g} s:\n{self.log('web')[-2000:]}\n"
            f"{self.log('worker')[-4000:]}"
        )

    def _web_up(self) -> bool:
        """True when the web answers ``/healthz``."""
        try:
            urllib.request.urlopen(f"{self.base}/healthz", timeout=2).close()
            return True
        except OSError:
            return False

    def _worker_idle(self, engine: Engine) -> bool:
        """True when this farm's worker has registered and is idle."""
        with engine.connect() as conn:
            state = conn.execute(
                text("SELECT state FROM workers WHERE hostname = :h"), {"h": self.hostname}
            ).scalar()
        return state == "idle"

    def engine(self) -> Engine:
        """An engine on the farm's database, for reading its records."""
        return create_engine(self.database_url, poolclass=NullPool)

    def peak_rss(self) -> dict[str, int | None]:
        """Peak RSS of the web, the worker's main process and its pool process(es)."""
        found: dict[str, int | None] = {}
        if "web" in self.processes:
            found["web"] = peak_rss_bytes(self.processes["web"].pid)
        if "worker" in self.processes:
            pid = self.processes["worker"].pid
            found["worker (main)"] = peak_rss_bytes(pid)
            children = child_pids(pid)
            found["worker (pool)"] = max((peak_rss_bytes(c) or 0 for c in children), default=None)
        return found

    def pool_pid(self) -> int | None:
        """The pid of the worker's pool process, the one that renders."""
        if "worker" not in self.processes:
            return None
        children = child_pids(self.processes["worker"].pid)
        return children[0] if children else None

    def cpu_seconds(self) -> float:
        """CPU time the web and the worker (main and pool processes, ffmpeg) have used."""
        pids = [process.pid for process in self.processes.values()]
        if "worker" in self.processes:
            pids += child_pids(self.processes["worker"].pid)
        return sum(cpu_seconds(pid) for pid in pids)

    def pin(self) -> None:
        """Pin the worker's pool process (it renders) to :func:`model_cpus`, the web and the
        worker's main process to :func:`farm_cpus`."""
        for name, process in self.processes.items():
            pin(process.pid, farm_cpus())
            if name == "worker":
                for child in child_pids(process.pid):
                    pin(child, model_cpus())

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL after 60 s)."""
        stop_children(list(self.processes.values()), 60)

    def __enter__(self) -> Farm:
        """Start the farm."""
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *_: object) -> None:
        """Stop the farm."""
        self.stop()


# --- talking to it --------------------------------------------------------------------------


def png_bytes(width: int, height: int) -> bytes:
    """A gradient PNG (the benchmarks' input image)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def multipart(fields: dict[str, str], image: bytes, boundary: str = "") -> tuple[bytes, str]:
    """A multipart/form-data body with an ``image`` PNG and text fields, and its type."""
    boundary = boundary or uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class JobParams:
    """The render every benchmark job asks for (the tiny model's defaults, a fixed seed)."""

    frames: int = 8
    steps: int = 4
    size: int = 64
    seed: int = 1234
    fps: int = 7
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int = 8

    def fields(self) -> dict[str, str]:
        """The form fields of the job."""
        return {
            "num_frames": str(self.frames),
            "num_inference_steps": str(self.steps),
            "width": str(self.size),
            "height": str(self.size),
            "seed": str(self.seed),
            "fps": str(self.fps),
            "motion_bucket_id": str(self.motion_bucket_id),
            "noise_aug_strength": str(self.noise_aug_strength),
            "decode_chunk_size": str(self.decode_chunk_size),
        }

    def describe(self) -> str:
        """The job as a table note reads it."""
        return f"{self.frames} frames of {self.size} x {self.size}, {self.steps} steps"


def submit(base: str, params: JobParams, image: bytes) -> str:
    """POST a job over HTTP; returns its id."""
    body, content_type = multipart(params.fields(), image)
    request = urllib.request.Request(
        f"{base}/api/v1/jobs", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return str(json.load(response)["id"])
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"submit refused: {error.code} {error.read()[:500]!r}") from None


@dataclass(frozen=True)
class JobRecord:
    """A finished job's timestamps as the farm recorded them (UTC)."""

    id: str
    state: str
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt_started_at: datetime | None
    attempt_duration_s: float | None
    video_key: str | None


def _aware(value: Any) -> Any:
    """A datetime read back from SQLite (naive, UTC, maybe a string) made UTC-aware."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value


def _job_uuid(engine: Engine, job_id: str) -> str:
    """A job id as the database stores it (SQLite: 32 hex digits, no dashes)."""
    return uuid.UUID(job_id).hex if engine.dialect.name == "sqlite" else job_id


def wait_jobs(
    engine: Engine, ids: Sequence[str], timeout_s: float, poll_s: float = 0.2
) -> list[JobRecord]:
    """Block until every job in ``ids`` has ended; returns their records (first attempt)."""
    keys = [_job_uuid(engine, i) for i in ids]
    params = {f"k{n}": key for n, key in enumerate(keys)}
    marks = ", ".join(f":k{n}" for n in range(len(keys)))
    done_sql = text(
        f"SELECT count(*) FROM jobs WHERE id IN ({marks}) AND state IN {TERMINAL_STATES}"
    )
    deadline = time.monotonic() + timeout_s
    with engine.connect() as conn:
        while conn.execute(done_sql, params).scalar() != len(keys):
            conn.rollback()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(keys)} job(s) did not end in {timeout_s:g} s")
            time.sleep(poll_s)
        rows = conn.execute(
            text(
                "SELECT j.id, j.state, j.error, j.created_at, j.started_at, j.finished_at, "
                "a.started_at, a.duration_s, j.video_key FROM jobs j "
                "LEFT JOIN attempts a ON a.job_id = j.id AND a.number = 1 "
                f"WHERE j.id IN ({marks})"
            ),
            params,
        ).all()
    by_id = {str(r[0]).replace("-", ""): r for r in rows}
    records = []
    for job_id, key in zip(ids, keys, strict=True):
        r = by_id[key.replace("-", "")]
        records.append(
            JobRecord(
                id=job_id,
                state=r[1],
                error=r[2],
                created_at=_aware(r[3]),
                started_at=_aware(r[4]),
                finished_at=_aware(r[5]),
                attempt_started_at=_aware(r[6]),
                attempt_duration_s=r[7],
                video_key=r[8],
            )
        )
    return records


def check_succeeded(records: Sequence[JobRecord], data_dir: Path) -> None:
    """Raise unless every job succeeded and its MP4 is stored."""
    for record in records:
        if record.state != "succeeded":
            raise RuntimeError(f"job {record.id} {record.state}: {record.error}")
        if not record.video_key or not (data_dir / "jobs" / record.video_key).is_file():
            raise RuntimeError(f"job {record.id} succeeded without its MP4 stored")


# --- figures --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by the nearest-rank method."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_table(markdown: str) -> list[dict[str, str]]:
    """Read back a table made by :func:`markdown_table`: one dict per row."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []

    def cells(line: str) -> list[str]:
        return [cell.strip() for cell in line.strip("|").split("|")]

    headers = cells(lines[0])
    return [dict(zip(headers, cells(line), strict=True)) for line in lines[2:]]


def parse_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every table in a Markdown text, each read by :func:`parse_table`."""
    blocks: list[list[str]] = [[]]
    for line in markdown.splitlines():
        if line.strip().startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [parse_table("\n".join(block)) for block in blocks if block]


def parse_ratio(output: str, name: str = "farm/bare ratio") -> float:
    """The value of the last ``<name>: X`` line of a benchmark's output."""
    found = re.findall(rf"^{re.escape(name)}: ([0-9.]+)\s*$", output, re.MULTILINE)
    if not found:
        raise ValueError(f"no '{name}: X' line in the output")
    return float(found[-1])


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal."""
    return f"{seconds * 1000:.1f} ms"


def fmt_mb(value: int | None) -> str:
    """Bytes as MB, or a dash."""
    return "-" if value is None else f"{value / 1e6:.0f} MB"


# --- docs/BENCHMARKS.md ---------------------------------------------------------------------

#: Sections in the order the file lists them.
SECTIONS = (
    "farm-overhead",
    "farm-overhead-all-cores",
    "queue-latency",
    "web",
    "history",
    "model-cache",
    "memory",
    "profile",
)
_HEADER = """# Benchmarks

What the farm costs beside the model itself, measured side by side in one run: ratios, not
absolute times, because the machines these run on are shared and noisy. `make bench` runs
every script under `bench/` and rewrites the sections below; each script run alone
(`python -m bench.<name> --write`) rewrites only its own. Each section says when, on what and
with which command it was measured.

**GPU: not measured.** Every figure here comes from the built-in tiny model on a CPU; the
GPU part of the benchmarks has not been run on a GPU yet.
"""


def machine() -> str:
    """The machine as a section states it: CPU, cores, memory, OS, Python and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f"{pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        memory = "RAM unknown"
    versions = []
    for package in ("torch", "diffusers", "celery", "sqlalchemy", "waitress"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory}, no GPU used; {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, {', '.join(versions)}"
    )


def command_line() -> str:
    """The command that ran this benchmark, as typed from the repository root (Markdown)."""
    module = Path(sys.argv[0]).stem
    command = shlex.join([".venv/bin/python", "-m", f"bench.{module}", *sys.argv[1:]])
    if os.environ.get("MAKELEVEL"):
        return f"`make bench`, which runs `{command}`"
    return f"`{command}`"


def section(title: str, table: str, notes: str = "", command: str = "") -> str:
    """A section's Markdown: its title, when/where/how it was measured, the table, notes."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"## {title}",
        f"Measured {when} on {machine()}.  \nCommand: {command or command_line()}",
        table,
    ]
    if notes:
        parts.append(notes.strip())
    return "\n\n".join(parts)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or add) section ``name`` of the benchmarks file, keeping the other sections."""
    sections: dict[str, str] = {}
    header = _HEADER
    if path.exists():
        text = path.read_text()
        pattern = re.compile(r"<!-- bench:([\w-]+) -->\n(.*?)\n<!-- /bench:\1 -->", re.DOTALL)
        sections = {m.group(1): m.group(2) for m in pattern.finditer(text)}
        # What stands before the first section was written by hand: kept as it is.
        header = text.split("<!-- bench:", 1)[0] if sections else header
    sections[name] = body.strip()
    order = [s for s in SECTIONS if s in sections] + sorted(set(sections) - set(SECTIONS))
    parts = [header.strip()]
    parts += [f"<!-- bench:{s} -->\n{sections[s]}\n<!-- /bench:{s} -->" for s in order]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".benchmarks.")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n\n".join(parts) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def cpu_seconds(pid: int) -> float:
    """CPU time a process has used, its waited-for children (ffmpeg) included; 0 when gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the name.
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")
