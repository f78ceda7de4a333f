"""Private Redis and PostgreSQL servers that a test owns, so it can stop and restart them.

The shared servers named by ``SVDFARM_TEST_REDIS_URL`` and ``SVDFARM_TEST_DATABASE_URL`` are
used by other tests at the same time and must never be restarted; a test that restarts its
broker or database starts one of these instead, on a free port, and removes it afterwards.

* :class:`PrivateRedis`: ``redis-server`` without persistence (``--save "" --appendonly no``),
  so a restart brings it back empty, the harshest case for the farm.
* :class:`PrivatePostgres`: a throwaway cluster made by ``initdb`` (run as the ``postgres``
  user when the tests run as root, which ``initdb`` refuses), started and stopped with
  ``pg_ctl``.

Both raise :class:`ServerUnavailable` with a clear message when their programs are missing
or the server does not come up; tests turn that into a failure, never a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.http import free_port


class ServerUnavailable(RuntimeError):
    """A private server could not be created or started."""


def _log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a server's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalRabbit:
    """The local RabbitMQ node, stopped and started with ``rabbitmqctl stop_app`` and
    ``start_app`` (its data kept: durable queues and persistent messages survive), reached
    through ``url`` (a virtual host of the test's own)."""

    def __init__(self, url: str) -> None:
        """Control the node behind ``url`` (local: ``rabbitmqctl`` must reach it)."""
        self.url = url
        self.running = True

    def stop(self) -> None:
        """Stop the RabbitMQ application (the Erlang node stays up): connections are cut."""
        from tests.processes import rabbitmqctl

        rabbitmqctl("stop_app")
        self.running = False

    def start(self, timeout_s: float = 60) -> None:
        """Start it again; return once it accepts connections."""
        from tests.processes import rabbitmqctl

        rabbitmqctl("start_app", timeout_s=timeout_s)
        rabbitmqctl("await_startup", "--timeout", str(int(timeout_s)), timeout_s=timeout_s + 10)
        self.running = True

    def close(self) -> None:
        """Leave the node running."""
        if not self.running:
            self.start()


class PrivateRedis:
    """A ``redis-server`` on 127.0.0.1 and a port of its own, with no persistence."""

    def __init__(self, port: int | None = None) -> None:
        """Prepare a server on ``port`` (a free one by default); :meth:`start` runs it."""
        self.executable = shutil.which("redis-server")
        if self.executable is None:
            raise ServerUnavailable(
                "redis-server is not installed (apt-get install redis-server): the restart "
                "tests need a private Redis they can stop and start"
            )
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="svdfarm-redis-"))
        self.log = self.dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The broker URL of this server (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        """True when the server answers PING."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self, timeout_s: float = 30) -> None:
        """Start the server (again) on the same port; return once it answers PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    self.executable or "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailable(
                    f"redis-server did not start on port {self.port}:\n{_log_tail(self.log)}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 30) -> None:
        """Stop the server with SIGTERM (it saves nothing); everything it held is gone."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop the server and start it again, empty, on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def postgres_bindir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/<version>/bin``)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        result = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            candidates.append(Path(result.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        """The numeric version in a /usr/lib/postgresql/<version>/bin path."""
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates += [
        Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    ]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise ServerUnavailable(
        "initdb and pg_ctl were not found (looked in `pg_config --bindir` and "
        "/usr/lib/postgresql/*/bin): install the PostgreSQL server (apt-get install "
        "postgresql) to run the restart tests"
    )


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1 and a port of its own, trust auth."""

    def __init__(self, port: int | None = None) -> None:
        """Create the cluster with ``initdb`` in a new temporary folder (not started yet)."""
        self.bindir = postgres_bindir()
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="svdfarm-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.running = False
        self.user: str | None = None
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                self.close()
                raise ServerUnavailable(
                    "running as root and there is no `postgres` user to run initdb as"
                ) from None
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
            self.user = "postgres"
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                what="initdb",
            )
        except ServerUnavailable:
            self.close()
            raise

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the cluster's ``postgres`` database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, what: str) -> None:
        """Run one of the cluster's programs (as ``postgres`` when we are root)."""
        argv = [str(self.bindir / program), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise ServerUnavailable(
                f"{what} failed ({result.returncode}): {' '.join(argv)}\n"
                f"{result.stdout}{result.stderr}\n{_log_tail(self.log)}"
            )

    def start(self) -> None:
        """Start the server (again) on the same port; return once it accepts connections."""
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            what="pg_ctl start",
        )
        self.running = True

    def stop(self) -> None:
        """Stop the server with ``pg_ctl stop -m fast``: open connections are cut."""
        if not self.running:
            return
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-m",
            "fast",
            "-w",
            "-t",
            "60",
            "stop",
            what="pg_ctl stop",
        )
        self.running = False

    def restart(self) -> None:
        """Stop the server and start it again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server (immediately if a fast stop fails) and remove the cluster."""
        try:
            self.stop()
        except ServerUnavailable:
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                    what="pg_ctl stop -m immediate",
                )
            except ServerUnavailable:
                pass
        self.running = False
        shutil.rmtree(self.base, ignore_errors=True)
