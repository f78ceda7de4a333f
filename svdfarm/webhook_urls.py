"""Which webhook URLs the farm sends to: the checks at submit, and the server-side request
forgery rules at send time.

A URL is ``http`` or ``https``, carries no credentials and is at most
:data:`MAX_URL_LENGTH` characters. At send time every address its host name resolves to must
be public: loopback, private, link-local, multicast, reserved, unspecified and shared
(carrier-grade NAT) addresses are refused, the cloud metadata addresses by name, and an
IPv4 address inside IPv6 (``::ffff:10.0.0.1``) is judged as the IPv4 one. The sender connects
to the address it checked (:mod:`svdfarm.webhook_http`), so a DNS answer that changes
between the check and the connection cannot reach an internal address.
``SVDFARM_WEBHOOK_ALLOW_PRIVATE=1`` lifts the address rules (tests, in-cluster receivers).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2000
SCHEMES = ("http", "https")
#: The cloud providers' instance metadata services (most are link-local or private anyway).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
#: Host names refused at submit without resolving them.
LOCAL_NAMES = ("localhost", "localhost.localdomain", "metadata.google.internal")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookUrlError(ValueError):
    """A webhook URL the farm will not use, with a message that names the problem."""


class RefusedAddress(WebhookUrlError):
    """A host that is, or resolves to, an address the farm does not send to."""


def forbidden_reason(address: Address) -> str | None:
    """Why the farm does not send to ``address`` (``loopback``, ``private``, ...), or None
    when it is a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return forbidden_reason(address.ipv4_mapped)
    checks = (
        (address in METADATA_ADDRESSES, "cloud metadata"),
        (address.is_loopback, "loopback"),
        (address.is_unspecified, "unspecified"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not public"),
    )
    for hit, reason in checks:
        if hit:
            return reason
    return None


def literal_address(host: str) -> Address | None:
    """``host`` as an IP address when it is one (``[::1]`` without its brackets), else None."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def check_url(url: str, *, allow_private: bool, field: str = "webhook_url") -> str:
    """``url`` stripped when it may be a webhook URL, else :class:`WebhookUrlError`.

    Checked without DNS: the scheme, the host, no credentials, the length, and a literal IP
    address (or ``localhost``) that is not public unless ``allow_private``.
    """
    url = url.strip()
    label = field.replace("_", " ").capitalize()
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"{label} is {len(url)} characters; at most {MAX_URL_LENGTH}.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"{label} {url[:80]!r} is not a URL: {exc}.") from None
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise WebhookUrlError(
            f"{label} {url[:80]!r} is not usable: give an http:// or https:// URL with a host."
        )
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError(
            f"{label} must not carry credentials (user:password@): the farm signs every "
            "delivery instead (see GET /api/v1/webhooks/secret)."
        )
    if port == 0:
        raise WebhookUrlError(f"{label} {url[:80]!r} has port 0.")
    if allow_private:
        return url
    host = parts.hostname.lower().rstrip(".")
    address = literal_address(host)
    reason = forbidden_reason(address) if address is not None else None
    if reason is None and (host in LOCAL_NAMES or host.endswith(".localhost")):
        reason = "loopback"
    if reason is not None:
        raise RefusedAddress(
            f"{label} {url[:80]!r} points at a {reason} address; webhooks go to public "
            "addresses only (SVDFARM_WEBHOOK_ALLOW_PRIVATE=1 allows others)."
        )
    return url


def resolve(host: str, port: int, *, allow_private: bool) -> list[Address]:
    """Every address ``host`` resolves to, in the resolver's order; :class:`RefusedAddress`
    when any of them is not public (unless ``allow_private``), :class:`WebhookUrlError` when
    it does not resolve. The caller connects to one of these, never to the name again."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError(f"cannot resolve {host[:100]!r}: {exc}") from None
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise WebhookUrlError(f"{host[:100]!r} resolves to no address")
    if not allow_private:
        for address in found:
            reason = forbidden_reason(address)
            if reason is not None:
                raise RefusedAddress(
                    f"{host[:100]!r} resolves to {address}, a {reason} address: refused "
                    "(SVDFARM_WEBHOOK_ALLOW_PRIVATE=1 allows it)"
                )
    return found
