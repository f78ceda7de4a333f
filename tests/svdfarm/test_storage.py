"""Job file storage: keys that cannot leave the root, writes that are atomic."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from svdfarm.storage import Storage

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    """A storage rooted in a not yet created folder."""
    return Storage(tmp_path / "jobs")


def test_keys_are_job_id_and_name() -> None:
    """A key is the canonical job id, a slash, the file name; a non-UUID id is refused."""
    assert Storage.key(JOB, "input.png") == f"{JOB}/input.png"
    assert Storage.key(str(JOB).upper(), "video.mp4") == f"{JOB}/video.mp4"
    with pytest.raises(ValueError):
        Storage.key("../../etc", "passwd")


def test_write_read_exists_delete(storage: Storage) -> None:
    """A written key exists under the root with the data; delete_job removes the job's folder."""
    key = Storage.key(JOB, "input.png")
    assert not storage.exists(key)
    path = storage.write_bytes(key, b"data")
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
        Storage.key(JOB, "../../outside.txt"),
    ],
)
def test_keys_that_leave_the_root_are_refused(storage: Storage, tmp_path: Path, key: str) -> None:
    """Path traversal and absolute keys raise ValueError and write nothing outside the root."""
    with pytest.raises(ValueError, match="outside the storage folder"):
        storage.path(key)
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.exists(key)
    assert not (tmp_path / "outside.txt").exists()


def test_a_symlink_out_of_the_root_is_refused(storage: Storage, tmp_path: Path) -> None:
    """A link inside the root that points outside it does not let a key escape."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    storage.root.mkdir()
    (storage.root / str(JOB)).symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        storage.write_bytes(Storage.key(JOB, "input.png"), b"x")
    assert list(outside.iterdir()) == []


def test_an_overwrite_replaces_the_file_whole(storage: Storage) -> None:
    """A reader holding the old file keeps reading the old bytes: the new file is renamed in,
    not written into the old one; no temporary file is left behind.
    """
    key = Storage.key(JOB, "video.mp4")
    path = storage.write_bytes(key, b"old" * 1000)
    with open(path, "rb") as reader:
        storage.write_bytes(key, b"new")
        assert reader.read() == b"old" * 1000
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["video.mp4"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(storage: Storage) -> None:
    """When writing fails half-way, the previous content stays and the temporary is removed."""
    key = Storage.key(JOB, "input.png")
    path = storage.write_bytes(key, b"kept")
    with pytest.raises(TypeError):
        storage.write_bytes(key, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"kept"
    assert os.listdir(path.parent) == ["input.png"]
