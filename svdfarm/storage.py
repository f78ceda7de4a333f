"""Local file storage of each job's input image and outputs under the data folder."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path


class Storage:
    """Files keyed ``<job id>/<name>`` under one root folder; writes are atomic."""

    def __init__(self, root: Path) -> None:
        """Use ``root`` (created on first write)."""
        self.root = root

    @staticmethod
    def key(job_id: uuid.UUID | str, name: str) -> str:
        """The storage key of file ``name`` of a job."""
        return f"{uuid.UUID(str(job_id))}/{name}"

    def path(self, key: str) -> Path:
        """The local path of ``key``; refuses keys that leave the root."""
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key {key!r} is outside the storage folder")
        return path

    def write_bytes(self, key: str, data: bytes) -> Path:
        """Write ``data`` at ``key`` atomically; returns the path."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def exists(self, key: str | None) -> bool:
        """True when ``key`` names a stored file."""
        return bool(key) and self.path(key or "").is_file()

    def delete_job(self, job_id: uuid.UUID | str) -> None:
        """Remove every file of a job."""
        shutil.rmtree(self.path(str(uuid.UUID(str(job_id)))), ignore_errors=True)
