"""``svdfarm web``'s server (:mod:`cli.web_server`): gunicorn's processes and threads from the
settings, ``GUNICORN_CMD_ARGS``, the access log, the proxies left to the app, SIGTERM; waitress
when asked."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cli import main
from cli.web_server import (
    GEVENT_CONNECTIONS,
    AccessLog,
    ServePlan,
    Server,
    default_worker_class,
    gunicorn_application,
)
from svdfarm import lifecycle
from svdfarm.db import Database
from svdfarm.lifecycle import By
from svdfarm.settings import Settings, SettingsError, load_settings
from svdfarm.states import Actor, Phase
from tests.conftest import DATABASES
from tests.http import free_port
from tests.load import request, wait_until_serving
from tests.processes import LiveProcess, start_svdfarm, start_web
from tests.rows import submit_small_job, wait_until

PLAN = ServePlan(Server.GUNICORN, "127.0.0.1", 8000, workers=3, threads=2)


def test_web_workers_default_to_the_cores_and_threads_to_four() -> None:
    """Unset, one process per core of four threads each; the variables change both."""
    settings = load_settings({})
    assert (settings.web_workers, settings.web_threads) == (os.cpu_count() or 1, 4)
    settings = load_settings({"SVDFARM_WEB_WORKERS": "5", "SVDFARM_WEB_THREADS": "16"})
    assert (settings.web_workers, settings.web_threads) == (5, 16)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SVDFARM_WEB_WORKERS", "many", "SVDFARM_WEB_WORKERS='many' is not an integer"),
        ("SVDFARM_WEB_WORKERS", "0", "SVDFARM_WEB_WORKERS=0 must be at least 1"),
        ("SVDFARM_WEB_THREADS", "1000", "SVDFARM_WEB_THREADS=1000 must be at most 256"),
    ],
)
def test_an_invalid_web_setting_is_refused_naming_the_variable(
    name: str, value: str, message: str
) -> None:
    """The error says which variable holds what, and what it must be."""
    with pytest.raises(SettingsError, match=message):
        load_settings({name: value})


def test_svdfarm_web_refuses_an_invalid_setting_before_serving(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``svdfarm web`` exits with status 2 and the variable's name; nothing is served."""
    monkeypatch.setenv("SVDFARM_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SVDFARM_WEB_THREADS", "four")
    assert main(["web", "--port", str(free_port())]) == 2
    assert "SVDFARM_WEB_THREADS='four' is not an integer" in capsys.readouterr().err


def test_svdfarm_web_runs_gevent_workers_where_gevent_is_installed() -> None:
    """gevent is in the web extra: ``svdfarm web`` uses its workers (a waiting event stream
    is a greenlet); without it, gthread's."""
    assert default_worker_class() == "gevent"
    plan = ServePlan(Server.GUNICORN, "127.0.0.1", 8000, 2, 4, worker_class="gevent")
    cfg = gunicorn_application(plan, load_settings({})).cfg
    assert (cfg.worker_class_str, cfg.worker_connections) == ("gevent", GEVENT_CONNECTIONS)
    assert "2 processes x 2000 connections, gevent" in plan.describe()


def test_gunicorn_runs_gthread_with_the_plan_and_trusts_no_forwarding_peer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Processes and threads from the plan, the access log on stdout, and no peer whose
    X-Forwarded-Proto gunicorn believes: the app's ProxyFix alone decides."""
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")
    cfg = gunicorn_application(PLAN, load_settings({})).cfg
    assert (cfg.workers, cfg.threads, cfg.worker_class_str) == (3, 2, "gthread")
    assert cfg.bind == ["127.0.0.1:8000"]
    assert cfg.accesslog == "-"
    assert cfg.forwarded_allow_ips == []
    assert cfg.worker_tmp_dir == "/dev/shm"  # heartbeats in memory (Linux)


def test_gunicorn_cmd_args_override_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GUNICORN_CMD_ARGS`` is applied last, as the ``gunicorn`` command applies it."""
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--workers 7 --timeout 45 --keep-alive 9")
    cfg = gunicorn_application(PLAN, load_settings({})).cfg
    assert (cfg.workers, cfg.threads, cfg.timeout, cfg.keepalive) == (7, 2, 45, 9)


def test_the_waitress_access_log_writes_a_combined_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One line per request: peer, time, request line, status, size, referer, user agent."""

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        """Answer 404 with a 2-byte body."""
        start_response("404 NOT FOUND", [("Content-Length", "2")])  # type: ignore[operator]
        return [b"no"]

    environ = {
        "REMOTE_ADDR": "10.0.0.7",
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/v1/jobs/x",
        "QUERY_STRING": "a=1",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_USER_AGENT": "curl/8",
    }
    assert AccessLog(app)(environ, lambda *args: None) == [b"no"]
    line = capsys.readouterr().out
    assert line.startswith("10.0.0.7 - - [")
    assert line.endswith('] "GET /api/v1/jobs/x?a=1 HTTP/1.1" 404 2 "-" "curl/8"\n')


def test_a_negative_workers_flag_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workers -1`` is an error naming the flag."""
    monkeypatch.setenv("SVDFARM_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SVDFARM_MODEL", "tiny")
    assert main(["web", "--workers", "-1"]) == 2
    assert "--workers -1 must be between 1 and 256" in capsys.readouterr().err


@pytest.fixture
def web_env(cli_env: dict[str, str]) -> dict[str, str]:
    """The command's environment with the gunicorn variables of this machine removed."""
    return {k: v for k, v in cli_env.items() if k not in ("GUNICORN_CMD_ARGS", "WEB_CONCURRENCY")}


@pytest.fixture
def started() -> Iterator[list[LiveProcess]]:
    """The servers a test starts, stopped (and their groups killed) afterwards."""
    servers: list[LiveProcess] = []
    yield servers
    for server in servers:
        server.stop(timeout_s=10)


def _start_web(
    servers: list[LiveProcess], env: dict[str, str], folder: Path, *args: str
) -> tuple[LiveProcess, int]:
    """``svdfarm web ARGS`` on a free port, once it serves /healthz."""
    port = free_port()
    web = start_svdfarm("web", ["web", "--port", str(port), *args], env, folder)
    servers.append(web)
    wait_until_serving(web, port)
    return web, port


def _access_lines(web: LiveProcess, path: str) -> list[str]:
    """The access-log lines of GET ``path`` the server has printed."""
    return [line for line in web.text(None).splitlines() if f'"GET {path} HTTP/1.1" 200' in line]


def _stops_on_sigterm(web: LiveProcess, within_s: float = 10) -> None:
    """SIGTERM ends the server, status 0, with no process left in its group."""
    web.process.send_signal(signal.SIGTERM)
    try:
        status = web.process.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {within_s:g} s after SIGTERM:\n{web.text()}") from None
    assert status == 0, web.text()
    wait_until(
        lambda: not _group(web.process.pid),
        timeout_s=5,
        what="the server's processes to exit",
        details=lambda: str(_group(web.process.pid)),
    )


def _group(pgid: int) -> list[int]:
    """The ids of the processes in process group ``pgid``."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(pid)
        except ProcessLookupError:
            continue
    return found


@pytest.mark.slow
def test_svdfarm_web_runs_gunicorn_workers_logs_each_request_and_stops_on_sigterm(
    tmp_path: Path, web_env: dict[str, str], started: list[LiveProcess]
) -> None:
    """SVDFARM_WEB_WORKERS processes serve; one access-log line per request; a client's
    X-Forwarded-Proto is not believed (no trusted proxy); SIGTERM stops it in seconds."""
    env = {**web_env, "SVDFARM_WEB_WORKERS": "3", "SVDFARM_WEB_THREADS": "2"}
    web, port = _start_web(started, env, tmp_path)
    wait_until(
        lambda: len(psutil.Process(web.process.pid).children()) == 3,
        timeout_s=30,
        what="gunicorn's 3 workers",
    )
    assert "gunicorn, 3 processes x 2000 connections, gevent" in web.text()
    for _ in range(5):
        # Its own query string: the readiness probe's retries (a slow start under load) may
        # be answered, and logged, late.
        answer = request(port, "GET", "/healthz?of=test", headers={"X-Forwarded-Proto": "https"})
        assert answer.status == 200
        assert answer.headers["server"] == "gunicorn"
        assert "strict-transport-security" not in answer.headers  # the request is not https
    wait_until(
        lambda: len(_access_lines(web, "/healthz?of=test")) >= 5, timeout_s=10, what="5 lines"
    )
    assert len(_access_lines(web, "/healthz?of=test")) == 5, web.text()
    _stops_on_sigterm(web)


@pytest.mark.slow
def test_gunicorn_leaves_trusted_proxies_to_the_app(
    tmp_path: Path, web_env: dict[str, str], started: list[LiveProcess]
) -> None:
    """With SVDFARM_TRUSTED_PROXIES=1 the proxy's X-Forwarded-Proto makes the request https."""
    env = {**web_env, "SVDFARM_TRUSTED_PROXIES": "1"}
    web, port = _start_web(started, env, tmp_path, "--workers", "1")
    answer = request(port, "GET", "/healthz", headers={"X-Forwarded-Proto": "https"})
    assert "strict-transport-security" in answer.headers, answer.headers


@pytest.mark.slow
def test_svdfarm_web_server_waitress_serves_logs_and_stops(
    tmp_path: Path, web_env: dict[str, str], started: list[LiveProcess]
) -> None:
    """``--server waitress``: one process, an access-log line per request, SIGTERM stops it."""
    web, port = _start_web(started, web_env, tmp_path, "--server", "waitress", "--threads", "2")
    assert request(port, "GET", "/healthz").headers["server"] == "svdfarm"  # its ident
    assert psutil.Process(web.process.pid).children() == []
    wait_until(lambda: len(_access_lines(web, "/healthz")) >= 2, timeout_s=10, what="2 lines")
    _stops_on_sigterm(web)


#: Event streams one gevent worker process holds in the test below.
STREAMS = 300


@pytest.mark.slow
@pytest.mark.parametrize("database_url", DATABASES[1:], indirect=True)
def test_one_gevent_process_holds_hundreds_of_event_streams_and_feeds_them_all(
    tmp_path: Path, settings: Settings, db: Database, started: list[LiveProcess]
) -> None:
    """One web process, 300 open event streams of one job: each gets the replay, then the
    job's next event and progress (PostgreSQL NOTIFY, one listener), within seconds."""
    job_id = submit_small_job(db, settings)
    port = free_port()
    web = start_web(settings, tmp_path, port, SVDFARM_WEB_WORKERS="1")
    started.append(web)
    wait_until_serving(web, port)
    streams = SocketStreams(port, f"/api/v1/jobs/{job_id}/events", STREAMS)
    try:
        streams.read_until(lambda text: text.count("event: event") >= 2, timeout_s=60)
        worker = By(Actor.WORKER, "gpu1@farm")
        with db.begin() as session:
            lifecycle.claim(session, settings, job_id, by=worker)
        with db.begin() as session:
            lifecycle.progress(
                session, job_id, by=worker, phase=Phase.DENOISING, fraction=0.5, step=1
            )
        streams.read_until(
            lambda text: '"type":"claimed"' in text and '"step":1' in text, timeout_s=30
        )
    finally:
        streams.close()
    assert "gevent" in web.text()


class SocketStreams:
    """``count`` event streams of ``path`` on raw sockets, read in this thread."""

    def __init__(self, port: int, path: str, count: int) -> None:
        """Open the connections and send each request."""
        request_bytes = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        ).encode()
        self.selector = selectors.DefaultSelector()
        self.texts: dict[socket.socket, str] = {}
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(request_bytes)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.texts[sock] = ""

    def read_until(self, done: Callable[[str], bool], timeout_s: float) -> None:
        """Read until every stream's text so far satisfies ``done``."""
        deadline = time.monotonic() + timeout_s
        while not all(done(text) for text in self.texts.values()):
            left = deadline - time.monotonic()
            waiting = sum(not done(text) for text in self.texts.values())
            assert left > 0, f"{waiting} of {len(self.texts)} streams still waiting"
            for key, _events in self.selector.select(timeout=min(left, 1.0)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                assert chunk, "the server closed a stream"
                self.texts[sock] += chunk.decode(errors="replace")

    def close(self) -> None:
        """Close every connection."""
        for sock in self.texts:
            self.selector.unregister(sock)
            sock.close()
        self.selector.close()
