"""One webhook POST, to an address checked before connecting (svdfarm.webhook_urls).

The host name is resolved once; every address is checked; the connection goes to a checked
address while the request names the host (``Host`` header, TLS server name and certificate
check), so a DNS answer that changes between the check and the connection cannot slip
through. Redirects are not followed (a 3xx is a failed try), and the answer's body is read
only a little.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from svdfarm.webhook_urls import Address, WebhookUrlError, check_url, resolve

#: How much of a receiver's answer is read (it is not used; reading lets it finish).
MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = "svdfarm-webhooks/1"


@dataclass(frozen=True)
class Answer:
    """How one try went: the HTTP status (None: no answer), the error, and the seconds a
    ``Retry-After`` asked for (None: none, or not readable)."""

    status: int | None
    error: str = ""
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        """True for a 2xx answer."""
        return self.status is not None and 200 <= self.status < 300


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one checked address, whatever the host name resolves to now."""

    def __init__(self, host: str, port: int, *, address: Address, timeout: float) -> None:
        """Name ``host`` in the request, connect to ``address``."""
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        """Open the TCP connection to the checked address."""
        self.sock = socket.create_connection((str(self.address), self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(_PinnedHTTP):
    """The same over TLS: the certificate is checked against the host name."""

    default_port = 443

    def __init__(self, host: str, port: int, *, address: Address, timeout: float) -> None:
        """Name ``host`` in the request and the TLS handshake, connect to ``address``."""
        super().__init__(host, port, address=address, timeout=timeout)
        self.context = ssl.create_default_context()

    def connect(self) -> None:
        """Open the TCP connection to the checked address and start TLS for the host name."""
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname=self.host)


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
    timeout_s: float,
) -> Answer:
    """POST ``body`` to ``url`` with ``headers``; never raises for a network failure or a
    refused address: the :class:`Answer` says what happened."""
    try:
        check_url(url, allow_private=allow_private, field="url")
        parts = urlsplit(url)
        assert parts.hostname is not None
        https = parts.scheme.lower() == "https"
        port = parts.port or (443 if https else 80)
        addresses = resolve(parts.hostname, port, allow_private=allow_private)
    except WebhookUrlError as exc:
        return Answer(None, f"refused: {exc}")
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    kind = _PinnedHTTPS if https else _PinnedHTTP
    connection = None
    error = ""
    for address in addresses:  # the next address only when this one took no connection
        candidate = kind(parts.hostname, port, address=address, timeout=timeout_s)
        try:
            candidate.connect()
        except OSError as exc:
            candidate.close()
            error = f"{type(exc).__name__} connecting to {address}: {exc}"[:500]
            continue
        connection = candidate
        break
    if connection is None:
        return Answer(None, error)
    try:
        connection.request(
            "POST",
            target,
            body=body,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers},
        )
        response = connection.getresponse()
        response.read(MAX_ANSWER_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        connection.close()
    retry = retry_after_seconds(response.getheader("Retry-After"))
    reason = "" if response.status < 300 else f"HTTP {response.status} {response.reason}"[:500]
    return Answer(response.status, reason, retry)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` header's wait in seconds (delay seconds or an HTTP date), or None."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())
