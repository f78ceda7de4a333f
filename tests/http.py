"""Requests from tests: a free port for a live server, a multipart body for the API, the CSRF
token of a page's form and the job id a form's redirect names."""

from __future__ import annotations

import re
import socket
import uuid

from flask.testing import FlaskClient
from werkzeug.test import TestResponse


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def multipart(fields: dict[str, str], image: bytes, filename: str = "in.png") -> tuple[bytes, str]:
    """A multipart/form-data body with an ``image`` PNG file and text fields, and its type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def form_token(client: FlaskClient, path: str = "/") -> str:
    """The CSRF token in the form on ``path``, read from the page as a browser would."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(True))
    assert found, f"no CSRF field on {path}"
    return found[1]


def job_id_from(response: TestResponse) -> str:
    """The job id in a redirect to a status page."""
    match = re.fullmatch(r"/jobs/([0-9a-f-]{36})", response.headers["Location"])
    assert match, response.headers["Location"]
    return match[1]
