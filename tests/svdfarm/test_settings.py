"""Settings from SVDFARM_* variables: defaults, overrides, URL fixes, clear refusals."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from svdfarm.settings import (
    DEFAULT_MODEL,
    MIN_SECRET_LENGTH,
    TINY_MODEL,
    AuthMode,
    ModelChoice,
    Settings,
    SettingsError,
    choose_model,
    is_password_hash,
    load_settings,
    persistent_secret,
)


def test_defaults_need_no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set: ./var, a SQLite file in it, the filesystem broker, SVD-XT."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings({})
    data_dir = (tmp_path / "var").resolve()
    assert settings.data_dir == data_dir
    assert settings.database_url == f"sqlite:///{data_dir / 'svdfarm.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.embedded_broker
    assert settings.broker_dir == data_dir / "broker"
    assert settings.storage_dir == data_dir / "jobs"
    assert settings.models_dir == data_dir / "models"
    assert settings.model == DEFAULT_MODEL
    assert settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_image_pixels == 40_000_000
    assert settings.allow_cpu and settings.casts
    assert (settings.max_attempts, settings.stop_timeout_s) == (8, 600)
    assert settings.secret_key == ""
    assert settings.task_time_limit_s > settings.task_soft_time_limit_s
    assert not data_dir.exists()  # reading settings writes nothing


def test_environment_overrides_every_option(tmp_path: Path) -> None:
    """Each SVDFARM_* variable sets its option, numbers parsed."""
    env = {
        "SVDFARM_DATA_DIR": str(tmp_path / "data"),
        "SVDFARM_DATABASE_URL": "sqlite:///elsewhere.db",
        "SVDFARM_BROKER_URL": "redis://cache:6379/1",
        "SVDFARM_SECRET_KEY": "s3cret",
        "SVDFARM_ADMIN_PASSWORD": "pw",
        "SVDFARM_MODEL": "tiny",
        "SVDFARM_MAX_UPLOAD_BYTES": "4096",
        "SVDFARM_MAX_IMAGE_PIXELS": "1000000",
        "SVDFARM_PROGRESS_INTERVAL": "0.25",
        "SVDFARM_TASK_SOFT_TIME_LIMIT": "60",
        "SVDFARM_TASK_TIME_LIMIT": "90",
        "SVDFARM_HUB_TIMEOUT": "3",
        "SVDFARM_CASTS": "0",
        "SVDFARM_MAX_ATTEMPTS": "3",
        "SVDFARM_ALLOW_CPU": "no",
        "SVDFARM_STOP_TIMEOUT": "30",
        "SVDFARM_HEARTBEAT_INTERVAL": "2",
        "SVDFARM_STORAGE_URL": "s3://bucket/renders",
        "SVDFARM_STORAGE_PROXY": "1",
        "SVDFARM_WEB_WORKERS": "3",
        "SVDFARM_WEB_THREADS": "8",
    }
    settings = load_settings(env)
    assert settings == Settings(
        data_dir=tmp_path / "data",
        database_url="sqlite:///elsewhere.db",
        broker_url="redis://cache:6379/1",
        secret_key="s3cret",
        admin_password="pw",
        model="tiny",
        max_upload_bytes=4096,
        max_image_pixels=1_000_000,
        progress_interval_s=0.25,
        task_soft_time_limit_s=60,
        task_time_limit_s=90,
        hub_timeout_s=3.0,
        casts=False,
        max_attempts=3,
        allow_cpu=False,
        stop_timeout_s=30,
        heartbeat_interval_s=2.0,
        storage_url="s3://bucket/renders",
        storage_proxy=True,
        web_workers=3,
        web_threads=8,
    )
    assert not settings.embedded_broker


def test_blank_variables_take_the_defaults(tmp_path: Path) -> None:
    """A variable set to spaces counts as unset."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_MODEL": "  ", "SVDFARM_CASTS": ""}
    settings = load_settings(env)
    assert (settings.model, settings.casts) == (DEFAULT_MODEL, True)


def test_data_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative or ~ data folder is resolved once, so a later chdir changes nothing."""
    monkeypatch.chdir(tmp_path)
    assert load_settings({"SVDFARM_DATA_DIR": "rel/dir"}).data_dir == tmp_path.resolve() / "rel/dir"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = load_settings({"SVDFARM_DATA_DIR": "~/farm"}).data_dir
    assert home == (tmp_path / "home" / "farm").resolve()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db:5432/farm", "postgresql+psycopg://u:p@db:5432/farm"),
        (
            "postgresql://u:p@db/farm?sslmode=require",
            "postgresql+psycopg://u:p@db/farm?sslmode=require",
        ),
        ("postgresql+psycopg://u@db/farm", "postgresql+psycopg://u@db/farm"),
        ("sqlite:////srv/farm.db", "sqlite:////srv/farm.db"),
    ],
)
def test_postgres_urls_get_the_psycopg_driver(url: str, expected: str, tmp_path: Path) -> None:
    """postgres:// and postgresql:// URLs are given psycopg 3; others are kept as they are."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_DATABASE_URL": url}
    assert load_settings(env).database_url == expected


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("MAX_UPLOAD_BYTES", "20MB", "not an integer"),
        ("MAX_UPLOAD_BYTES", "1.5", "not an integer"),
        ("MAX_UPLOAD_BYTES", "100", "at least 1024"),
        ("MAX_IMAGE_PIXELS", "lots", "not an integer"),
        ("MAX_IMAGE_PIXELS", "100", "at least 4096"),
        ("TASK_SOFT_TIME_LIMIT", "0", "at least 1"),
        ("TASK_TIME_LIMIT", "1h", "not an integer"),
        ("PROGRESS_INTERVAL", "fast", "not a number"),
        ("PROGRESS_INTERVAL", "-1", "must not be negative"),
        ("HUB_TIMEOUT", "ten", "not a number"),
        ("RETENTION", "soon", "'soon' is not a duration"),
        ("RETENTION", "-3d", "'-3d' is not a duration"),
        ("INPUT_RETENTION", "7w", "use a number with s, m, h or d"),
        ("MIN_FREE_BYTES", "1GB", "not an integer"),
        ("WEBHOOK_RETRY_SCALE", "fast", "not a number"),
        ("WEBHOOK_RETRY_SCALE", "0", "must be from 0.001 to 100"),
        ("WEBHOOK_RETRY_SCALE", "1000", "must be from 0.001 to 100"),
    ],
)
def test_bad_numbers_name_the_variable(name: str, value: str, phrase: str, tmp_path: Path) -> None:
    """A value that is not a number, or too small, is a SettingsError naming the variable."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path), f"SVDFARM_{name}": value}
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    assert f"SVDFARM_{name}" in str(info.value)
    assert phrase in str(info.value)


def test_the_hard_time_limit_must_exceed_the_soft_one(tmp_path: Path) -> None:
    """A hard limit not above the soft one is refused, naming both variables."""
    env = {
        "SVDFARM_DATA_DIR": str(tmp_path),
        "SVDFARM_TASK_SOFT_TIME_LIMIT": "100",
        "SVDFARM_TASK_TIME_LIMIT": "100",
    }
    both = "SVDFARM_TASK_TIME_LIMIT.*SVDFARM_TASK_SOFT_TIME_LIMIT"
    with pytest.raises(SettingsError, match=both):
        load_settings(env)


def test_settings_read_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a mapping, load_settings reads os.environ."""
    monkeypatch.setenv("SVDFARM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SVDFARM_MODEL", "from-env")
    assert load_settings().model == "from-env"


def test_with_overrides_copies(tmp_path: Path) -> None:
    """with_overrides returns a changed copy and leaves the original alone."""
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path)})
    changed = settings.with_overrides(model="tiny")
    assert (changed.model, settings.model) == ("tiny", DEFAULT_MODEL)


def test_ensure_dirs_makes_the_broker_folders(tmp_path: Path) -> None:
    """The filesystem broker gets queue, processed and control folders; Redis gets none."""
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path / "a")})
    settings.ensure_dirs()
    for path in (settings.storage_dir, settings.models_dir):
        assert path.is_dir()
    for sub in ("queue", "processed", "control"):
        assert (settings.broker_dir / sub).is_dir()
    redis = load_settings(
        {"SVDFARM_DATA_DIR": str(tmp_path / "b"), "SVDFARM_BROKER_URL": "redis://x"}
    )
    redis.ensure_dirs()
    assert redis.storage_dir.is_dir()
    assert not redis.broker_dir.exists()


def test_persistent_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    """Without SVDFARM_SECRET_KEY a random key is written once (mode 0600) and reused."""
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path / "data")})
    first = persistent_secret(settings)
    assert len(first) >= 32
    assert persistent_secret(settings) == first
    path = settings.data_dir / "secret_key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = load_settings({"SVDFARM_DATA_DIR": str(tmp_path / "other")})
    assert persistent_secret(other) != first


def test_a_set_secret_key_is_used_and_nothing_written(tmp_path: Path) -> None:
    """SVDFARM_SECRET_KEY wins and no key file is created."""
    settings = load_settings(
        {"SVDFARM_DATA_DIR": str(tmp_path / "data"), "SVDFARM_SECRET_KEY": "given"}
    )
    assert persistent_secret(settings) == "given"
    assert not (settings.data_dir / "secret_key").exists()


#: A werkzeug scrypt hash's shape: method, salt, hash.
HASHED = "scrypt:32768:8:1$c2FsdHNhbHQ$" + "ab" * 32


def test_production_problems_name_every_unsafe_setting(tmp_path: Path) -> None:
    """A placeholder secret and a plain admin password are both reported, each with its fix;
    a long random secret and a hashed password report nothing."""
    unsafe = load_settings(
        {
            "SVDFARM_DATA_DIR": str(tmp_path),
            "SVDFARM_SECRET_KEY": "Change-Me",
            "SVDFARM_ADMIN_PASSWORD": "hunter2",
        }
    )
    problems = unsafe.production_problems()
    assert len(problems) == 3
    assert problems[0].startswith("SVDFARM_SECRET_KEY is a placeholder")
    assert "token_hex(32)" in problems[0]
    assert problems[1].startswith("SVDFARM_AUTH is open: production needs SVDFARM_AUTH=keys")
    assert "svdfarm admin hash-password" in problems[2]
    safe = unsafe.with_overrides(
        secret_key="k" * MIN_SECRET_LENGTH, admin_password=HASHED, auth=AuthMode.KEYS
    )
    assert is_password_hash(HASHED) and not is_password_hash("hunter2")
    assert safe.production_problems() == []


def test_check_production_refuses_only_in_production(tmp_path: Path) -> None:
    """Unsafe settings pass while SVDFARM_PRODUCTION is off and raise, listing every problem,
    once it is on."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_SECRET_KEY": "short", "SVDFARM_AUTH": "keys"}
    load_settings(env).check_production()
    production = load_settings({**env, "SVDFARM_PRODUCTION": "1"})
    with pytest.raises(SettingsError) as refused:
        production.check_production()
    assert str(refused.value) == (
        "SVDFARM_PRODUCTION is on and the settings are unsafe: SVDFARM_SECRET_KEY has 5 "
        f"characters; production needs at least {MIN_SECRET_LENGTH} "
        '(python -c "import secrets; print(secrets.token_hex(32))").'
    )
    assert not tmp_path.joinpath("secret_key").exists()


def _no_gpu_query() -> int:
    raise AssertionError("the rule asked for GPUs when the answer did not depend on them")


def test_the_model_rule_takes_svdfarm_model_when_set() -> None:
    """SVDFARM_MODEL decides, whatever the machine, without asking for GPUs."""
    choice = choose_model({"SVDFARM_MODEL": "/models/svd"}, _no_gpu_query)
    assert choice == ModelChoice("/models/svd", "SVDFARM_MODEL")
    assert str(choice) == "model: /models/svd (SVDFARM_MODEL)"


def test_the_model_rule_without_svdfarm_model() -> None:
    """Unset (or blank): the tiny model on one machine without a GPU; SVD-XT with a GPU, or
    on a farm whose broker is not the embedded one (its web host has no GPU to ask)."""
    no_gpu = choose_model({"SVDFARM_MODEL": " "}, lambda: 0)
    assert str(no_gpu) == "model: tiny (no GPU and SVDFARM_MODEL unset)"
    assert no_gpu.model == TINY_MODEL
    gpu = choose_model({}, lambda: 2)
    assert gpu == ModelChoice(DEFAULT_MODEL, "SVDFARM_MODEL unset and 2 GPU(s) found")
    farm = choose_model({"SVDFARM_BROKER_URL": "redis://cache:6379/0"}, _no_gpu_query)
    assert farm.model == DEFAULT_MODEL and "broker" in farm.reason


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("", 0.0), ("0", 0.0), ("90", 90.0), ("30s", 30.0), ("15m", 900.0), ("12h", 43200.0),
     ("7d", 604800.0), ("1.5H", 5400.0)],
)  # fmt: skip
def test_retention_is_a_duration_and_zero_keeps_forever(
    value: str, seconds: float, tmp_path: Path
) -> None:
    """SVDFARM_RETENTION and SVDFARM_INPUT_RETENTION read 30s, 12h, 7d (or seconds); unset or 0
    keeps forever. SVDFARM_MIN_FREE_BYTES defaults to 1 GiB."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_RETENTION": value}
    settings = load_settings({**env, "SVDFARM_INPUT_RETENTION": value})
    assert (settings.retention_s, settings.input_retention_s) == (seconds, seconds)
    assert settings.min_free_bytes == 1024**3


def test_auth_mode_is_open_or_keys(tmp_path: Path) -> None:
    """SVDFARM_AUTH takes open (the default) or keys, in any case; anything else is refused
    with the choices."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path)}
    assert load_settings(env).auth is AuthMode.OPEN
    assert load_settings({**env, "SVDFARM_AUTH": "KEYS"}).auth is AuthMode.KEYS
    with pytest.raises(SettingsError, match="SVDFARM_AUTH='token': use open or keys"):
        load_settings({**env, "SVDFARM_AUTH": "token"})
