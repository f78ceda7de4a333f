"""The HTTP server behind ``svdfarm web``: gunicorn where it runs (POSIX), waitress on Windows or
when asked (``--server waitress``).

gunicorn runs as a library (:func:`gunicorn_application`): ``SVDFARM_WEB_WORKERS`` processes (by
default one per core), each gevent's (:data:`GEVENT_CONNECTIONS` connections a process, each
request a greenlet: a live event stream waiting for its next event costs a few kilobytes,
not a thread) where gevent is installed, else gthread's with ``SVDFARM_WEB_THREADS`` threads
each; the combined access log on stdout, and gunicorn's own ``GUNICORN_CMD_ARGS`` applied
last, so an operator can change any of its settings (``--worker-class gthread`` too). Each
worker process builds the app itself (no preload), so no database connection or broker
channel is ever shared across a fork.

Proxies are the app's business (``SVDFARM_TRUSTED_PROXIES``, werkzeug's ProxyFix in
:mod:`web.security`): gunicorn is told to trust no peer's ``X-Forwarded-Proto``, which it
would otherwise believe from 127.0.0.1, and waitress drops the forwarded headers unless a
proxy is trusted.
"""

from __future__ import annotations

import enum
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from svdfarm.settings import Settings, SettingsError

#: gunicorn's default access log format: the combined log format plus nothing.
COMBINED = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
#: Connections one gevent worker process holds at once (gunicorn's ``worker_connections``).
GEVENT_CONNECTIONS = 2000
#: Seconds a gunicorn worker gets to finish its requests after SIGTERM: within the 10 s
#: ``docker stop`` waits before it kills.
GRACEFUL_TIMEOUT_S = 8


class Server(enum.Enum):
    """The WSGI servers ``svdfarm web`` can run."""

    GUNICORN = "gunicorn"
    WAITRESS = "waitress"

    @classmethod
    def default(cls) -> Server:
        """gunicorn where it runs (POSIX systems), waitress elsewhere (Windows)."""
        return cls.GUNICORN if os.name == "posix" else cls.WAITRESS


@dataclass(frozen=True)
class ServePlan:
    """What ``svdfarm web`` serves, where, and with how many processes and threads."""

    server: Server
    host: str
    port: int
    workers: int
    threads: int
    #: gunicorn's worker class: gevent where installed (:func:`default_worker_class`).
    worker_class: str = "gthread"

    def describe(self) -> str:
        """The line ``svdfarm web`` prints at start."""
        if self.server is Server.WAITRESS:
            shape = f"waitress, 1 process, {self.workers * self.threads} threads"
        elif self.worker_class == "gevent":
            shape = f"gunicorn, {self.workers} processes x {GEVENT_CONNECTIONS} connections, gevent"
        else:
            shape = f"gunicorn, {self.workers} processes x {self.threads} threads"
        return f"svdfarm web on http://{self.host}:{self.port}/ ({shape})"


def default_worker_class() -> str:
    """``gevent`` when it is installed (the ``web`` extra installs it), else ``gthread``."""
    import importlib.util

    return "gevent" if importlib.util.find_spec("gevent") is not None else "gthread"


def serve(plan: ServePlan, settings: Settings) -> int:
    """Run ``plan`` until stopped (SIGTERM or Ctrl-C); the exit status."""
    if plan.server is Server.WAITRESS:
        return _serve_waitress(plan, settings)
    if os.name != "posix":
        raise SettingsError("gunicorn runs on POSIX systems only: use --server waitress")
    try:
        import gunicorn  # noqa: F401
    except ImportError:
        raise SettingsError(
            "gunicorn is not installed: pip install 'svdfarm[web]' (or use --server waitress)"
        ) from None
    gunicorn_application(plan, settings).run()
    return 0


def gunicorn_options(plan: ServePlan) -> dict[str, Any]:
    """gunicorn's settings for ``plan``, before ``GUNICORN_CMD_ARGS``."""
    options: dict[str, Any] = {
        "bind": [f"[{plan.host}]:{plan.port}" if ":" in plan.host else f"{plan.host}:{plan.port}"],
        "workers": plan.workers,
        "threads": plan.threads,
        "worker_class": plan.worker_class,
        "worker_connections": GEVENT_CONNECTIONS,
        "accesslog": "-",
        "access_log_format": COMBINED,
        "errorlog": "-",
        "loglevel": "info",
        "graceful_timeout": GRACEFUL_TIMEOUT_S,
        # The app decides which proxies to believe (ProxyFix, SVDFARM_TRUSTED_PROXIES).
        "forwarded_allow_ips": "",
        "proc_name": "svdfarm-web",
        # gunicorn 24+: no control socket, one path per user that two servers would share.
        "control_socket_disable": True,
    }
    if os.path.isdir("/dev/shm"):
        # The workers' heartbeat files: in memory, not on a container's overlay disk, where a
        # slow write can make the master think a worker hangs (gunicorn's own advice).
        options["worker_tmp_dir"] = "/dev/shm"
    return options


def gunicorn_application(plan: ServePlan, settings: Settings) -> Any:
    """gunicorn's application for ``plan``, configured; ``.run()`` serves until stopped."""
    from gunicorn.app.base import BaseApplication

    class WebApplication(BaseApplication):  # type: ignore[misc]
        """gunicorn serving ``web.create_app`` with the farm's settings."""

        def load_config(self) -> None:
            """Our options, then ``GUNICORN_CMD_ARGS`` over them (as ``gunicorn`` does)."""
            for key, value in gunicorn_options(plan).items():
                if key in self.cfg.settings:  # an older gunicorn lacks the newest settings
                    self.cfg.set(key, value)
            from_env = self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env())
            for key, value in vars(from_env).items():
                if value is not None and key != "args":
                    self.cfg.set(key.lower(), value)

        def load(self) -> Callable[..., Any]:
            """Build the app, in each worker process after the fork."""
            from web import create_app

            return create_app({"SVDFARM_SETTINGS": settings})

    return WebApplication(prog="svdfarm web")


def _serve_waitress(plan: ServePlan, settings: Settings) -> int:
    """One waitress process of ``workers * threads`` threads, its access log on stdout."""
    from waitress import serve as waitress_serve

    from web import create_app

    app = create_app({"SVDFARM_SETTINGS": settings})
    # waitress stops on SystemExit: it closes the sockets and lets running requests finish.
    signal.signal(signal.SIGTERM, _exit_quietly)
    waitress_serve(
        AccessLog(app),
        host=plan.host,
        port=plan.port,
        threads=plan.workers * plan.threads,
        ident="svdfarm",
        # waitress drops X-Forwarded-* unless told otherwise; keep them only when a proxy is
        # trusted (SVDFARM_TRUSTED_PROXIES), and ProxyFix decides how many hops to believe.
        clear_untrusted_proxy_headers=not settings.trusted_proxies,
    )
    return 0


def _exit_quietly(_signum: int, _frame: Any) -> None:
    """A SIGTERM handler: stop the way Ctrl-C stops waitress, with status 0."""
    raise SystemExit(0)


class AccessLog:
    """WSGI middleware writing one combined-format line per request to stdout (waitress has
    no access log); the size is the ``Content-Length`` the app set, ``-`` when it set none."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        """Wrap ``app``."""
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Serve the request and log it once its status is known."""

        def logging_start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            """Log, then hand on to the server's start_response."""
            size = next((v for k, v in headers if k.lower() == "content-length"), "-")
            sys.stdout.write(combined_line(environ, status.split(" ", 1)[0], size) + "\n")
            sys.stdout.flush()
            return start_response(status, headers, *exc)

        return self.app(environ, logging_start_response)


def combined_line(environ: dict[str, Any], status: str, size: str) -> str:
    """One request in the combined log format, as gunicorn writes it."""
    path = environ.get("PATH_INFO", "")
    if environ.get("QUERY_STRING"):
        path += "?" + environ["QUERY_STRING"]
    request = f"{environ.get('REQUEST_METHOD', '-')} {path} {environ.get('SERVER_PROTOCOL', '-')}"
    when = time.strftime("[%d/%b/%Y:%H:%M:%S %z]")
    return (
        f'{environ.get("REMOTE_ADDR", "-")} - - {when} "{request}" {status} {size} '
        f'"{environ.get("HTTP_REFERER", "-")}" "{environ.get("HTTP_USER_AGENT", "-")}"'
    )
