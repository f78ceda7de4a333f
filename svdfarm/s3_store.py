"""The S3 (or MinIO) job file store, reached through boto3.

The endpoint, region and credentials come from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``) or any other source boto3 reads; svdfarm never logs them.
"""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from svdfarm.storage import Store

_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3Store(Store):
    """Objects ``<prefix>/<job id>/<name>`` in one bucket; each put is whole or absent."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        """Use ``bucket`` through the boto3 S3 ``client``, under ``prefix`` (may be empty)."""
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    @classmethod
    def from_environment(cls, bucket: str, prefix: str) -> S3Store:
        """A store whose client boto3 configures from the AWS variables."""
        # MinIO and other self-hosted endpoints serve buckets by path, not by host name.
        style = "path" if os.environ.get("AWS_ENDPOINT_URL") else "auto"
        config = Config(
            signature_version="s3v4", s3={"addressing_style": style}, retries={"mode": "standard"}
        )
        return cls(boto3.client("s3", config=config), bucket, prefix)

    def _object(self, key: str) -> str:
        """The object name of ``key``; refuses keys that could name another prefix's objects."""
        parts = key.split("/")
        if "\\" in key or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"storage key {key!r} is outside the storage folder")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        """``s3://bucket/object`` for messages."""
        return f"s3://{self.bucket}/{self._object(key)}"

    def write_bytes(self, key: str, data: bytes) -> None:
        """Put ``data`` at ``key``."""
        self.client.put_object(
            Bucket=self.bucket, Key=self._object(key), Body=data, ContentType=_type_of(key)
        )

    def read_bytes(self, key: str) -> bytes:
        """Get the object's bytes."""
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise FileNotFoundError(f"{self._where(key)} is not stored") from None
            raise
        return bytes(answer["Body"].read())

    def put_file(self, key: str, path: Path) -> None:
        """Upload ``path`` (multipart when large; the object appears only when complete)."""
        self.client.upload_file(
            str(path), self.bucket, self._object(key), ExtraArgs={"ContentType": _type_of(key)}
        )

    def exists(self, key: str | None) -> bool:
        """True when the object exists."""
        if not key:
            return False
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    def size(self, key: str) -> int | None:
        """The object's ContentLength, or None when it does not exist."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        return int(head["ContentLength"])

    def delete(self, key: str) -> None:
        """Delete the object (S3 answers the same when it is missing)."""
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def list_keys(self, prefix: str) -> list[str]:
        """Keys of the objects under ``prefix``."""
        base = f"{self.prefix}/" if self.prefix else ""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base + prefix
        )
        return sorted(o["Key"][len(base) :] for page in pages for o in page.get("Contents", []))

    def download_url(
        self, key: str, *, filename: str, expires_s: int = 300, attachment: bool = True
    ) -> str | None:
        """A presigned GET of the object, saved as ``filename`` (shown inline without
        ``attachment``)."""
        disposition = "attachment" if attachment else "inline"
        params = {
            "Bucket": self.bucket,
            "Key": self._object(key),
            "ResponseContentDisposition": f'{disposition}; filename="{filename}"',
            "ResponseContentType": _type_of(key),
        }
        url = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=expires_s)
        return str(url)


def _type_of(key: str) -> str:
    """The content type of a key by its extension."""
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _code(exc: ClientError) -> str:
    """The error code of a boto3 client error."""
    return str(exc.response.get("Error", {}).get("Code", ""))
