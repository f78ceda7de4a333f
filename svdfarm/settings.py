"""Every option of svdfarm, read from ``SVDFARM_*`` environment variables in one place.

The embedded defaults need no server: a SQLite file and kombu's filesystem broker under
``SVDFARM_DATA_DIR`` (``./var``). Point ``SVDFARM_DATABASE_URL`` at PostgreSQL and
``SVDFARM_BROKER_URL`` at Redis and the same code runs in production.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from svdfarm.catalog import DEFAULT_MODELS, CatalogEntry, find_entry, parse_models

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"
#: The built-in tiny model's name (random weights, renders on a CPU in seconds).
TINY_MODEL = "tiny"
#: Pillow refuses to open images above twice its MAX_IMAGE_PIXELS (89,478,485) whatever we
#: allow, so a larger setting would promise what the upload check cannot keep.
MAX_IMAGE_PIXELS_CAP = 2 * 89_478_485
#: The shortest ``SVDFARM_SECRET_KEY`` production accepts.
MIN_SECRET_LENGTH = 32
#: Placeholders from the docs and deploy examples, and the usual guesses: never a real secret.
KNOWN_DEFAULT_SECRETS = frozenset(
    {
        "change-me",
        "changeme",
        "change-me-to-a-long-random-string",
        "another-long-random-string",
        "another-long-random-string-of-at-least-32-characters",
        "a-password-for-flower",
        "a-long-random-password",
        "the-admin-password",
        "dev",
        "development",
        "secret",
        "secret-key",
        "secret_key",
        "your-secret-key",
        "test-secret",
        "browser-test-secret",
    }
)
#: The most server processes, or threads per process, ``svdfarm web`` accepts.
MAX_WEB = 256
#: Method prefixes of werkzeug password hashes; anything else is a plain password.
PASSWORD_HASH_METHODS = ("scrypt:", "pbkdf2:")
_MAKE_A_KEY = 'python -c "import secrets; print(secrets.token_hex(32))"'


class SettingsError(ValueError):
    """An environment variable holds a value svdfarm cannot use."""


def _str(env: Mapping[str, str], name: str, default: str) -> str:
    """Return ``SVDFARM_<name>`` or the default when unset or blank."""
    value = env.get(f"SVDFARM_{name}", "").strip()
    return value or default


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None
) -> int:
    """Parse ``SVDFARM_<name>`` as an integer between ``minimum`` and ``maximum``."""
    raw = _str(env, name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"SVDFARM_{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"SVDFARM_{name}={value} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"SVDFARM_{name}={value} must be at most {maximum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    """Parse ``SVDFARM_<name>`` as a non-negative number."""
    raw = _str(env, name, str(default))
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"SVDFARM_{name}={raw!r} is not a number") from None
    if value < 0:
        raise SettingsError(f"SVDFARM_{name}={value} must not be negative")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    """Parse ``SVDFARM_<name>`` as a yes/no flag."""
    raw = _str(env, name, "1" if default else "0").lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"SVDFARM_{name}={raw!r} is not a yes/no value (use 1 or 0)")


@dataclass(frozen=True)
class StorageTarget:
    """Where job files live: a local folder (``path``) or an S3 bucket and key prefix."""

    scheme: str  # "file" or "s3"
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    def __str__(self) -> str:
        """The store as a URL (it holds no secret: keys come from the AWS variables)."""
        if self.scheme == "file":
            return f"file://{self.path}"
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")


def _shown(url: str) -> str:
    """``url`` fit for an error message: a user:password part is masked."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def parse_storage_url(url: str, name: str = "SVDFARM_STORAGE_URL") -> StorageTarget:
    """Read ``SVDFARM_STORAGE_URL`` (or the option ``name``, in messages):
    ``file:///absolute/folder`` or ``s3://bucket/prefix``."""
    parts = urlsplit(url)
    problem = ""
    if parts.scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            problem = "a file URL names no host: use file:///absolute/folder"
        elif not path.startswith("/"):
            problem = "the folder must be an absolute path: use file:///absolute/folder"
        else:
            return StorageTarget("file", path=Path(path).resolve())
    elif parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if "@" in bucket or parts.password or parts.username:
            problem = (
                "credentials do not belong in the URL: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        elif not bucket:
            problem = "it names no bucket: use s3://bucket/prefix"
        elif parts.query or parts.fragment:
            problem = "an S3 URL takes no query or fragment: use AWS_ENDPOINT_URL for the endpoint"
        else:
            return StorageTarget("s3", bucket=bucket, prefix=prefix)
    else:
        problem = "use file:///absolute/folder or s3://bucket/prefix"
    raise SettingsError(f"{name}={_shown(url)!r} is not usable: {problem}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(env: Mapping[str, str], name: str, default: str) -> float:
    """Parse ``SVDFARM_<name>`` as a duration in seconds: ``30s``, ``15m``, ``12h``, ``7d`` or a
    plain number of seconds; ``0`` means never (kept forever)."""
    raw = _str(env, name, default)
    text = raw.lower()
    unit = _DURATION_UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    try:
        value = float(number) * (unit or 1)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SettingsError(
            f"SVDFARM_{name}={raw!r} is not a duration: use a number with s, m, h or d "
            "(30s, 12h, 7d), or 0 to keep forever"
        )
    return value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, so ``taskset`` and cpusets count;
    a container's CPU quota does not: set ``SVDFARM_WEB_WORKERS`` there)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class AuthMode(str, Enum):
    """``SVDFARM_AUTH``: who may submit and read jobs."""

    #: No login: each browser session and each API client address is its own anonymous owner.
    OPEN = "open"
    #: The API needs ``Authorization: Bearer <key>``, the form a user login.
    KEYS = "keys"


def _auth(env: Mapping[str, str]) -> AuthMode:
    """Parse ``SVDFARM_AUTH``."""
    raw = _str(env, "AUTH", "open").lower()
    try:
        return AuthMode(raw)
    except ValueError:
        raise SettingsError(f"SVDFARM_AUTH={raw!r}: use open or keys") from None


@dataclass(frozen=True)
class Settings:
    """The farm's configuration; build it with :func:`load_settings`."""

    data_dir: Path
    database_url: str
    broker_url: str
    secret_key: str
    admin_password: str
    model: str
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    progress_interval_s: float = 0.5
    #: Seconds between previews of the denoising latents (worker.previews); 0: none.
    preview_interval_s: float = 2.0
    task_soft_time_limit_s: int = 3 * 3600
    task_time_limit_s: int = 3 * 3600 + 300
    hub_timeout_s: float = 10.0
    casts: bool = True
    max_attempts: int = 8
    allow_cpu: bool = True
    stop_timeout_s: int = 600
    heartbeat_interval_s: float = 10.0
    production: bool = False
    submit_rate_per_minute: int = 30
    max_queued_jobs: int = 1000
    trusted_proxies: int = 0
    #: ``svdfarm web``'s server processes (gunicorn workers; by default one per core) and the
    #: threads each runs (waitress: one process of ``web_workers * web_threads`` threads).
    web_workers: int = field(default_factory=usable_cores)
    web_threads: int = 4
    #: Database connections each web process keeps in its pool (10 more under load): a
    #: gevent process serves many requests at once, and a request that waits for a pooled
    #: connection waits behind others that take it first (measured: p99 1.5 s at 5).
    web_db_pool: int = 20
    max_deliveries: int = 3
    reap_interval_s: float = 30.0
    db_retry_timeout_s: float = 600.0
    #: How long outputs (video, poster) and inputs are kept after a job ends; 0 = forever.
    retention_s: float = 0.0
    input_retention_s: float = 0.0
    #: Submits are refused while a local store has less free space than this; 0 = no check.
    min_free_bytes: int = 1024**3
    #: ``SVDFARM_STORAGE_URL``; empty: the data folder's storage folder (:attr:`storage_dir`).
    storage_url: str = ""
    storage_proxy: bool = False
    #: ``SVDFARM_MODELS``: the models jobs may name (``id=source,...``, svdfarm.catalog).
    models: str = DEFAULT_MODELS
    #: ``SVDFARM_WORKER_MODELS``: what a worker advertises; empty: the catalog's models whose
    #: files it has, the tiny model and its ``SVDFARM_MODEL``.
    worker_models: str = ""
    #: ``SVDFARM_AUTH``: ``open`` (no login; anonymous owners) or ``keys`` (API keys, user
    #: logins); production requires ``keys`` (svdfarm.users).
    auth: AuthMode = field(default_factory=lambda: AuthMode.OPEN)
    #: Messages the dispatcher keeps on a queue beyond its idle consumers (svdfarm.dispatch).
    dispatch_margin: int = 0
    #: How far back fair share counts an owner's GPU time.
    fair_share_window_s: float = 3600.0
    #: A queued job no worker of its class ever took fails after this; 0 = waits forever.
    max_wait_s: float = 0.0
    #: ``SVDFARM_WEBHOOK_ALLOW_PRIVATE``: webhooks may go to loopback, private, link-local and
    #: other non-public addresses (tests, in-cluster receivers); off, they are refused.
    webhook_allow_private: bool = False
    #: ``SVDFARM_WEBHOOK_TIMEOUT``: how long one webhook POST may take, in seconds.
    webhook_timeout_s: float = 15.0
    #: ``SVDFARM_WEBHOOK_RETRY_SCALE``: every wait between webhook retries times this (5 s,
    #: 5 min... at 1; tests use 0.01), the three days before giving up unchanged.
    webhook_retry_scale: float = 1.0

    @property
    def offline_after_s(self) -> float:
        """A worker whose last heartbeat is older than this (three missed beats) is offline."""
        return 3 * self.heartbeat_interval_s

    @property
    def embedded_broker(self) -> bool:
        """True when the broker is kombu's server-less filesystem transport."""
        return self.broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        """Folder of the embedded broker's message files."""
        return self.data_dir / "broker"

    @property
    def storage_dir(self) -> Path:
        """The data folder's storage folder: the default store (``SVDFARM_STORAGE_URL``)."""
        return self.data_dir / "jobs"

    @property
    def storage(self) -> StorageTarget:
        """Where job files live (``SVDFARM_STORAGE_URL``, default :attr:`storage_dir`)."""
        if not self.storage_url:
            return StorageTarget("file", path=self.storage_dir)
        return parse_storage_url(self.storage_url)

    @property
    def catalog(self) -> list[CatalogEntry]:
        """The models jobs may name: ``SVDFARM_MODELS``, and ``SVDFARM_MODEL`` when it names
        none of them (its own id then)."""
        entries = parse_models(self.models)
        if self.model and find_entry(entries, self.model) is None:
            entries.append(CatalogEntry(self.model, self.model))
        return entries

    @property
    def models_dir(self) -> Path:
        """Folder where built-in models (the tiny one) are saved."""
        return self.data_dir / "models"

    def with_overrides(self, **changes: Any) -> Settings:
        """Return a copy with some fields replaced (tests, the CLI's flags)."""
        return replace(self, **changes)

    def ensure_dirs(self) -> None:
        """Create the data folders this configuration writes to."""
        target = self.storage
        for path in (self.data_dir, target.path, self.models_dir):
            if path is not None:
                path.mkdir(parents=True, exist_ok=True)
        if self.embedded_broker:
            for sub in ("queue", "processed", "control"):
                (self.broker_dir / sub).mkdir(parents=True, exist_ok=True)

    def production_problems(self) -> list[str]:
        """What makes these settings unsafe to serve the public with; empty when nothing does."""
        problems = []
        secret = self.secret_key
        if not secret:
            problems.append(
                "SVDFARM_SECRET_KEY is not set: production needs its own key "
                f"of at least {MIN_SECRET_LENGTH} characters ({_MAKE_A_KEY})."
            )
        elif secret.strip().lower() in KNOWN_DEFAULT_SECRETS:
            problems.append(
                "SVDFARM_SECRET_KEY is a placeholder from the examples: make a random key "
                f"({_MAKE_A_KEY})."
            )
        elif len(secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"SVDFARM_SECRET_KEY has {len(secret)} characters; production needs at least "
                f"{MIN_SECRET_LENGTH} ({_MAKE_A_KEY})."
            )
        if self.auth is not AuthMode.KEYS:
            problems.append(
                "SVDFARM_AUTH is open: production needs SVDFARM_AUTH=keys (API keys and user "
                "logins; make them with `svdfarm users add` and `svdfarm keys create`)."
            )
        password = self.admin_password
        if password and not is_password_hash(password):
            problems.append(
                "SVDFARM_ADMIN_PASSWORD is a plain password: production needs its hash "
                "(make one with `svdfarm admin hash-password`)."
            )
        return problems

    def check_production(self) -> None:
        """With ``SVDFARM_PRODUCTION`` on, raise :class:`SettingsError` listing every unsafe
        setting (:meth:`production_problems`); nothing otherwise. Run it before anything is
        written or started."""
        problems = self.production_problems() if self.production else []
        if problems:
            raise SettingsError(
                "SVDFARM_PRODUCTION is on and the settings are unsafe: " + " ".join(problems)
            )


def is_password_hash(value: str) -> bool:
    """True when ``value`` is a werkzeug password hash (``method$salt$hash``), not a password."""
    return value.startswith(PASSWORD_HASH_METHODS) and value.count("$") == 2


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    data_dir = Path(_str(env, "DATA_DIR", "./var")).expanduser().resolve()
    database_url = _str(env, "DATABASE_URL", f"sqlite:///{data_dir / 'svdfarm.db'}")
    if database_url.startswith("postgresql://") or database_url.startswith("postgres://"):
        # psycopg 3 is the driver we ship; plain postgresql:// would ask for psycopg2.
        database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
    broker_url = _str(env, "BROKER_URL", "filesystem://")
    settings = Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        secret_key=_str(env, "SECRET_KEY", ""),
        admin_password=_str(env, "ADMIN_PASSWORD", ""),
        model=_str(env, "MODEL", DEFAULT_MODEL),
        max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1024),
        max_image_pixels=_int(
            env, "MAX_IMAGE_PIXELS", 40_000_000, minimum=64 * 64, maximum=MAX_IMAGE_PIXELS_CAP
        ),
        progress_interval_s=_float(env, "PROGRESS_INTERVAL", 0.5),
        preview_interval_s=_float(env, "PREVIEW_INTERVAL", 2.0),
        task_soft_time_limit_s=_int(env, "TASK_SOFT_TIME_LIMIT", 3 * 3600, minimum=1),
        task_time_limit_s=_int(env, "TASK_TIME_LIMIT", 3 * 3600 + 300, minimum=1),
        hub_timeout_s=_float(env, "HUB_TIMEOUT", 10.0),
        casts=_bool(env, "CASTS", True),
        max_attempts=_int(env, "MAX_ATTEMPTS", 8, minimum=1, maximum=10),
        allow_cpu=_bool(env, "ALLOW_CPU", True),
        stop_timeout_s=_int(env, "STOP_TIMEOUT", 600, minimum=1),
        heartbeat_interval_s=_float(env, "HEARTBEAT_INTERVAL", 10.0),
        production=_bool(env, "PRODUCTION", False),
        submit_rate_per_minute=_int(env, "SUBMIT_RATE", 30, minimum=0),
        max_queued_jobs=_int(env, "MAX_QUEUED", 1000, minimum=0),
        trusted_proxies=_int(env, "TRUSTED_PROXIES", 0, minimum=0, maximum=10),
        web_workers=_int(env, "WEB_WORKERS", usable_cores(), minimum=1, maximum=MAX_WEB),
        web_threads=_int(env, "WEB_THREADS", 4, minimum=1, maximum=MAX_WEB),
        web_db_pool=_int(env, "WEB_DB_POOL", 20, minimum=1, maximum=1000),
        max_deliveries=_int(env, "MAX_DELIVERIES", 3, minimum=1, maximum=100),
        reap_interval_s=_float(env, "REAP_INTERVAL", 30.0),
        db_retry_timeout_s=_float(env, "DB_RETRY_TIMEOUT", 600.0),
        retention_s=_duration(env, "RETENTION", "0"),
        input_retention_s=_duration(env, "INPUT_RETENTION", "0"),
        min_free_bytes=_int(env, "MIN_FREE_BYTES", 1024**3, minimum=0),
        storage_url=_str(env, "STORAGE_URL", ""),
        storage_proxy=_bool(env, "STORAGE_PROXY", False),
        models=_str(env, "MODELS", DEFAULT_MODELS),
        worker_models=_str(env, "WORKER_MODELS", ""),
        auth=_auth(env),
        dispatch_margin=_int(env, "DISPATCH_MARGIN", 0, minimum=0, maximum=1000),
        fair_share_window_s=_duration(env, "FAIR_SHARE_WINDOW", "1h") or 3600.0,
        max_wait_s=_duration(env, "MAX_WAIT", "0"),
        webhook_allow_private=_bool(env, "WEBHOOK_ALLOW_PRIVATE", False),
        webhook_timeout_s=_float(env, "WEBHOOK_TIMEOUT", 15.0) or 15.0,
        webhook_retry_scale=_float(env, "WEBHOOK_RETRY_SCALE", 1.0),
    )
    if not 0.001 <= settings.webhook_retry_scale <= 100:
        raise SettingsError(
            f"SVDFARM_WEBHOOK_RETRY_SCALE={settings.webhook_retry_scale:g} must be from 0.001 "
            "to 100 (1: retries after 5 s, 5 min, 30 min...)"
        )
    for name, text in (("MODELS", settings.models), ("WORKER_MODELS", settings.worker_models)):
        try:
            if text:
                parse_models(text)
        except ValueError as exc:
            raise SettingsError(f"SVDFARM_{name}={text!r} is not usable: {exc}") from None
    if settings.storage_url:
        parse_storage_url(settings.storage_url)  # refused at start, not at the first upload
    if settings.task_time_limit_s <= settings.task_soft_time_limit_s:
        raise SettingsError(
            "SVDFARM_TASK_TIME_LIMIT must be larger than SVDFARM_TASK_SOFT_TIME_LIMIT "
            f"({settings.task_time_limit_s} <= {settings.task_soft_time_limit_s})"
        )
    return settings


@dataclass(frozen=True)
class ModelChoice:
    """The model a command runs and why, as it prints it at start."""

    model: str
    reason: str

    def __str__(self) -> str:
        """``model: tiny (no GPU and SVDFARM_MODEL unset)``."""
        return f"model: {self.model} ({self.reason})"


def choose_model(env: Mapping[str, str], gpu_count: Callable[[], int]) -> ModelChoice:
    """The one rule every ``svdfarm`` command picks its model by.

    ``SVDFARM_MODEL`` when set. Unset: SVD-XT when the broker is not the embedded one (a farm
    that may span machines, whose web and workers must agree without asking each machine for
    a GPU), or when ``gpu_count()`` finds a CUDA device; otherwise, one machine without a
    GPU, the built-in tiny model. ``gpu_count`` is only called when the answer depends on it.
    """
    given = _str(env, "MODEL", "")
    if given:
        return ModelChoice(given, "SVDFARM_MODEL")
    if not _str(env, "BROKER_URL", "filesystem://").startswith("filesystem://"):
        return ModelChoice(
            DEFAULT_MODEL, "SVDFARM_MODEL unset and the broker is not the embedded one"
        )
    gpus = gpu_count()
    if gpus:
        return ModelChoice(DEFAULT_MODEL, f"SVDFARM_MODEL unset and {gpus} GPU(s) found")
    return ModelChoice(TINY_MODEL, "no GPU and SVDFARM_MODEL unset")


def persistent_secret(settings: Settings) -> str:
    """Return ``SVDFARM_SECRET_KEY``, or a random key kept in the data folder, made once.

    Production sets the variable; a single machine keeps a key on disk so that sessions
    survive a restart without anyone having to invent one.
    """
    if settings.secret_key:
        return settings.secret_key
    path = settings.data_dir / "secret_key"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path.read_text().strip()
