"""Where each job's input image and outputs are kept: a local folder or an S3 bucket.

``SVDFARM_STORAGE_URL`` picks the store (:func:`open_store`); both kinds answer the same
:class:`Store` interface, keyed ``<job id>/<name>``. A worker puts its outputs under its
claim's own names (``video.<token>.mp4``) and the finishing transaction points the job's row
at them, so the database, not a rename, decides which render is the job's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from svdfarm.settings import Settings

#: Names of a job's outputs; the claim token goes between stem and suffix.
OUTPUT_STEMS = ("video", "poster", "frames")
#: The file name of each output format (``svdfarm.params.OUTPUT_FORMATS``), as the web serves it.
OUTPUT_NAMES = {
    "mp4": "video.mp4",
    "webm": "video.webm",
    "gif": "video.gif",
    "frames": "frames.zip",
}


def output_name(output: str) -> str:
    """The file name of an output format: ``video.webm``, ``frames.zip``."""
    return OUTPUT_NAMES[output]


def output_keys(job_id: uuid.UUID | str, token: str, formats: Iterable[str]) -> dict[str, str]:
    """The storage key of each output format a claim writes (``video.<token>.webm``)."""
    keys = {}
    for output in formats:
        stem, _, suffix = output_name(output).partition(".")
        keys[output] = Store.key(job_id, f"{stem}.{token}.{suffix}")
    return keys


def preview_key(job_id: uuid.UUID | str, token: str, step: int) -> str:
    """The storage key of a claim's preview after denoising step ``step``
    (``preview.<token>.<step>.jpg``, worker.previews)."""
    return Store.key(job_id, f"preview.{token}.{step}.jpg")


def preview_step(key: str | None, token: str | None) -> int | None:
    """The step of the preview stored at ``key`` when the claim ``token`` wrote it (the job's
    current claim), else None: a lost claim's preview, a malformed key, no key."""
    if not key or not token:
        return None
    name = key.rpartition("/")[2]
    kind, _, rest = name.partition(".")
    owner, _, rest = rest.partition(".")
    step, _, suffix = rest.partition(".")
    if kind != "preview" or owner != token or suffix != "jpg" or not step.isdigit():
        return None
    return int(step)


class Store(ABC):
    """A job file store: keys ``<job id>/<name>``, whole-object writes, nothing half written."""

    @staticmethod
    def key(job_id: uuid.UUID | str, name: str) -> str:
        """The storage key of file ``name`` of a job."""
        return f"{uuid.UUID(str(job_id))}/{name}"

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` at ``key``, replacing whatever was there, all at once."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The bytes at ``key``; :class:`FileNotFoundError` when nothing is stored there."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the local file ``path`` at ``key`` (a rendered video), all at once."""

    @abstractmethod
    def exists(self, key: str | None) -> bool:
        """True when ``key`` names a stored object (False for None or empty)."""

    def size(self, key: str) -> int | None:
        """The size in bytes of the object at ``key``, or None when nothing is stored there."""
        try:
            return len(self.read_bytes(key))
        except FileNotFoundError:
            return None

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing one is fine."""

    @abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every stored key starting with ``prefix``, sorted."""

    def delete_job(self, job_id: uuid.UUID | str) -> None:
        """Remove every object of a job, a lost claim's outputs included."""
        for key in self.list_keys(f"{uuid.UUID(str(job_id))}/"):
            self.delete(key)

    def local_path(self, key: str) -> Path | None:
        """The file of ``key`` on this machine (a file store), or None (S3)."""
        return None

    def download_url(
        self, key: str, *, filename: str, expires_s: int = 300, attachment: bool = True
    ) -> str | None:
        """A URL a browser can fetch ``key`` from directly for ``expires_s`` seconds, saved as
        ``filename`` (shown inline without ``attachment``); None when the web must send it
        itself (a file store)."""
        return None

    def free_bytes(self) -> int | None:
        """Free space left for the store (a file store's disk), or None when unbounded (S3)."""
        return None


def other_claims_outputs(store: Store, job_id: uuid.UUID | str, token: str) -> list[str]:
    """Keys of the job's outputs rendered under a claim other than ``token`` (a lost one)."""
    mine = {Store.key(job_id, f"{stem}.{token}") for stem in OUTPUT_STEMS}
    found = []
    for stem in OUTPUT_STEMS:
        for key in store.list_keys(Store.key(job_id, f"{stem}.")):
            if key.rsplit(".", 1)[0] not in mine:
                found.append(key)
    return found


class FileStore(Store):
    """Files under one root folder (created on first write); writes are atomic renames."""

    def __init__(self, root: Path) -> None:
        """Use ``root``."""
        self.root = root

    def path(self, key: str) -> Path:
        """The local path of ``key``; refuses keys that leave the root."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key {key!r} is outside the storage folder")
        return path

    def _replace_with(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        """Write a temporary file beside ``key`` with ``write(fh)``, then rename it into place."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key`` atomically."""
        self._replace_with(key, lambda fh: fh.write(data))

    def read_bytes(self, key: str) -> bytes:
        """The file's bytes."""
        return self.path(key).read_bytes()

    def put_file(self, key: str, path: Path) -> None:
        """Copy ``path`` to ``key`` atomically (it may be on another file system)."""
        self.path(key)  # a key outside the root is refused before anything is read
        with path.open("rb") as source:
            self._replace_with(key, lambda fh: shutil.copyfileobj(source, fh))

    def exists(self, key: str | None) -> bool:
        """True when ``key`` names a stored file."""
        return bool(key) and self.path(key or "").is_file()

    def size(self, key: str) -> int | None:
        """The file's size, or None when there is no file."""
        path = self.path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        """Remove the file of ``key``, if any."""
        self.path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str) -> list[str]:
        """Stored keys under ``prefix``; temporaries of writes under way are not keys."""
        folder = self.path(prefix.rpartition("/")[0]) if "/" in prefix else self.root.resolve()
        if not folder.is_dir():
            return []
        root = self.root.resolve()
        keys = (p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and "/.tmp-" not in f"/{k}")

    def delete_job(self, job_id: uuid.UUID | str) -> None:
        """Remove the job's folder."""
        shutil.rmtree(self.path(str(uuid.UUID(str(job_id)))), ignore_errors=True)

    def local_path(self, key: str) -> Path | None:
        """The file's path."""
        return self.path(key)

    def free_bytes(self) -> int | None:
        """Free bytes on the disk of the root (or of its nearest existing parent)."""
        folder = self.root.resolve()
        while not folder.exists():
            folder = folder.parent
        return shutil.disk_usage(folder).free


def open_store(settings: Settings) -> Store:
    """The store ``SVDFARM_STORAGE_URL`` names (default: the data folder's storage folder)."""
    target = settings.storage
    if target.path is not None:
        return FileStore(target.path)
    from svdfarm.s3_store import S3Store  # boto3 loads only for a farm that stores in S3

    return S3Store.from_environment(target.bucket, target.prefix)
