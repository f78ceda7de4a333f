"""Job file stores: one contract for a folder and an S3 bucket (moto's server, or the MinIO
``SVDFARM_TEST_S3_URL`` names); a folder's keys cannot leave its root and its writes are atomic."""

from __future__ import annotations

import os
import re
import urllib.request
import uuid
from pathlib import Path

import pytest

from svdfarm.settings import Settings, SettingsError, load_settings
from svdfarm.storage import FileStore, Store, open_store, other_claims_outputs
from tests.conftest import S3Bucket

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture
def storage(tmp_path: Path) -> FileStore:
    """A storage rooted in a not yet created folder."""
    return FileStore(tmp_path / "jobs")


def test_keys_are_job_id_and_name() -> None:
    """A key is the canonical job id, a slash, the file name; a non-UUID id is refused."""
    assert Store.key(JOB, "input.png") == f"{JOB}/input.png"
    assert Store.key(str(JOB).upper(), "video.mp4") == f"{JOB}/video.mp4"
    with pytest.raises(ValueError):
        Store.key("../../etc", "passwd")


def test_write_read_exists_delete(storage: FileStore) -> None:
    """A written key exists under the root with the data; delete_job removes the job's folder."""
    key = Store.key(JOB, "input.png")
    assert not storage.exists(key)
    storage.write_bytes(key, b"data")
    path = storage.path(key)
    assert path == storage.root.resolve() / str(JOB) / "input.png"
    assert path.read_bytes() == b"data"
    assert storage.exists(key)
    assert not storage.exists(None)
    assert not storage.exists("")
    storage.delete_job(JOB)
    assert not storage.exists(key)
    assert not (storage.root / str(JOB)).exists()
    storage.delete_job(uuid.uuid4())  # nothing there: no error


@pytest.mark.parametrize(
    "key",
    [
        "../outside.txt",
        f"{JOB}/../../outside.txt",
        "/etc/passwd",
        "..",
        Store.key(JOB, "../../outside.txt"),
    ],
)
def test_keys_that_leave_the_root_are_refused(storage: FileStore, tmp_path: Path, key: str) -> None:
    """Path traversal and absolute keys raise ValueError and write nothing outside the root."""
    with pytest.raises(ValueError, match="outside the storage folder"):
        storage.path(key)
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.exists(key)
    with pytest.raises(ValueError):
        storage.put_file(key, tmp_path / "any")
    assert not (tmp_path / "outside.txt").exists()


def test_a_symlink_out_of_the_root_is_refused(storage: FileStore, tmp_path: Path) -> None:
    """A link inside the root that points outside it does not let a key escape."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    storage.root.mkdir()
    (storage.root / str(JOB)).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        storage.write_bytes(Store.key(JOB, "input.png"), b"x")
    assert list(outside.iterdir()) == []


def test_an_overwrite_replaces_the_file_whole(storage: FileStore) -> None:
    """A reader holding the old file keeps reading the old bytes: the new file is renamed in,
    not written into the old one; no temporary file is left behind.
    """
    key = Store.key(JOB, "video.mp4")
    storage.write_bytes(key, b"old" * 1000)
    path = storage.path(key)
    with open(path, "rb") as reader:
        storage.write_bytes(key, b"new")
        assert reader.read() == b"old" * 1000
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["video.mp4"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(storage: FileStore) -> None:
    """When writing fails half-way, the previous content stays and the temporary is removed."""
    key = Store.key(JOB, "input.png")
    storage.write_bytes(key, b"kept")
    path = storage.path(key)
    with pytest.raises(TypeError):
        storage.write_bytes(key, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"kept"
    assert os.listdir(path.parent) == ["input.png"]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """Each kind of store, opened from ``SVDFARM_STORAGE_URL`` as the farm opens it."""
    env = {"SVDFARM_DATA_DIR": str(tmp_path / "var")}
    if request.param == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        env["SVDFARM_STORAGE_URL"] = bucket.url
    else:
        env["SVDFARM_STORAGE_URL"] = f"file://{tmp_path / 'elsewhere'}"
    return open_store(load_settings(env))


def test_every_store_keeps_the_same_promises(store: Store, tmp_path: Path) -> None:
    """Write, read, put a file, list by prefix, delete one key (missing too) and a whole job."""
    other = uuid.uuid4()
    key = Store.key(JOB, "input.png")
    assert not store.exists(key) and not store.exists(None) and not store.exists("")
    with pytest.raises(FileNotFoundError):
        store.read_bytes(key)
    store.write_bytes(key, b"image")
    store.write_bytes(key, b"image 2")  # replaced whole
    assert store.read_bytes(key) == b"image 2" and store.exists(key)
    rendered = tmp_path / "video.mp4"
    rendered.write_bytes(b"\x00video" * 1000)
    store.put_file(Store.key(JOB, "video.abc.mp4"), rendered)
    store.write_bytes(Store.key(JOB, "poster.abc.png"), b"poster")
    store.write_bytes(Store.key(other, "input.png"), b"other job")
    assert store.read_bytes(Store.key(JOB, "video.abc.mp4")) == rendered.read_bytes()
    assert store.list_keys(f"{JOB}/") == [
        Store.key(JOB, "input.png"),
        Store.key(JOB, "poster.abc.png"),
        Store.key(JOB, "video.abc.mp4"),
    ]
    assert store.list_keys(f"{JOB}/video.") == [Store.key(JOB, "video.abc.mp4")]
    store.delete(Store.key(JOB, "poster.abc.png"))
    store.delete(Store.key(JOB, "poster.abc.png"))  # missing: fine
    assert not store.exists(Store.key(JOB, "poster.abc.png"))
    store.delete_job(JOB)
    assert store.list_keys(f"{JOB}/") == []
    assert store.read_bytes(Store.key(other, "input.png")) == b"other job"
    store.delete_job(uuid.uuid4())  # nothing there: no error


def test_only_other_claims_outputs_are_swept(store: Store) -> None:
    """The outputs of a lost claim are found by their token; the winner's and the input not."""
    for name in ("input.png", "video.won.mp4", "poster.won.png", "video.lost.mp4"):
        store.write_bytes(Store.key(JOB, name), b"x")
    assert other_claims_outputs(store, JOB, "won") == [Store.key(JOB, "video.lost.mp4")]


def test_a_file_store_is_local_and_an_s3_store_is_not(store: Store) -> None:
    """A folder gives paths and free space and no URL; S3 gives a presigned URL that serves
    the object with its name, and no path."""
    key = Store.key(JOB, "video.abc.mp4")
    store.write_bytes(key, b"movie")
    if isinstance(store, FileStore):
        assert store.local_path(key) == store.path(key)
        assert store.download_url(key, filename="v.mp4") is None
        assert (store.free_bytes() or 0) > 0
        return
    assert store.local_path(key) is None and store.free_bytes() is None
    url = store.download_url(key, filename="svdfarm-job.mp4", expires_s=120)
    assert url is not None and "X-Amz-Expires=120" in url
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b"movie"
        assert answer.headers["Content-Disposition"] == 'attachment; filename="svdfarm-job.mp4"'
        assert answer.headers["Content-Type"] == "video/mp4"


@pytest.mark.parametrize("key", ["../outside", f"{JOB}/../../x", "/abs", f"{JOB}//x", ""])
def test_an_s3_store_refuses_keys_outside_its_prefix(s3_bucket: S3Bucket, key: str) -> None:
    """Keys with empty, ``.`` or ``..`` parts could reach another prefix's objects."""
    store = open_store(Settings_for(s3_bucket.url))
    with pytest.raises(ValueError, match="outside the storage folder"):
        store.write_bytes(key, b"x")
    assert store.list_keys("") == []


def Settings_for(url: str) -> Settings:  # noqa: N802 - reads like the settings it makes
    """Settings storing at ``url``."""
    return load_settings({"SVDFARM_STORAGE_URL": url, "SVDFARM_DATA_DIR": "/nonexistent"})


def test_the_default_store_is_the_data_folders_storage_folder(tmp_path: Path) -> None:
    """Without SVDFARM_STORAGE_URL the store is ``<data dir>/jobs``, as before."""
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path)})
    store = open_store(settings)
    assert isinstance(store, FileStore) and store.root == tmp_path / "jobs"
    assert str(settings.storage) == f"file://{tmp_path / 'jobs'}"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://host/x", "use file:///absolute/folder or s3://bucket/prefix"),
        ("file://host/x", "names no host"),
        ("file:relative", "absolute path"),
        ("s3:///prefix", "names no bucket"),
        ("s3://bucket/p?region=x", "no query"),
    ],
)
def test_a_bad_storage_url_is_refused_at_start(url: str, problem: str) -> None:
    """The error names the variable, the value and what to write instead."""
    with pytest.raises(
        SettingsError, match=re.escape(f"SVDFARM_STORAGE_URL={url!r}") + ".*" + problem
    ):
        load_settings({"SVDFARM_STORAGE_URL": url, "SVDFARM_DATA_DIR": "/nonexistent"})


def test_credentials_in_a_storage_url_are_refused_and_not_repeated() -> None:
    """Keys belong in the AWS variables; the message does not echo them."""
    with pytest.raises(SettingsError) as refused:
        load_settings({"SVDFARM_STORAGE_URL": "s3://AKIAKEY:hunter2@bucket/p"})
    assert "AWS_SECRET_ACCESS_KEY" in str(refused.value)
    assert "hunter2" not in str(refused.value) and "AKIAKEY" not in str(refused.value)
    assert "s3://***@bucket/p" in str(refused.value)
