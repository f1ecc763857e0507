"""Outbound requests to URLs that clients give us (webhooks, image URLs), made so they cannot be turned
against us or the network we run in.

A URL is refused when its host resolves to a loopback, private, link-local, multicast, reserved or
unspecified address (an IPv6 address that carries an IPv4 one is judged by both, see ``embedded_ipv4``), or
when its host is no valid host name or its port no port, unless the host (``host`` or ``host:port``) is listed in SEGSERVE_ALLOWED_URL_HOSTS.
The request then goes to the very address that was checked (the Host header and the TLS name stay the
URL's), so a DNS answer that changes between the check and the connection cannot slip past. Redirects are
not followed, and timeouts and a size limit apply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass

import httpx

RESOLVE_TIMEOUT_S = 5.0


class UrlRefused(Exception):
    """The URL is not one we may call: wrong scheme, or a host that resolves to a non-public address."""


class FetchFailed(Exception):
    """The URL was allowed, but no acceptable answer came from it."""


class TooLarge(FetchFailed):
    """The answer was over the size limit."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: httpx.Headers
    body: bytes


def allowed_hosts(setting: str) -> frozenset[str]:
    """SEGSERVE_ALLOWED_URL_HOSTS as a set: comma-separated ``host`` or ``host:port``, case-insensitive."""
    return frozenset(entry.strip().lower() for entry in setting.split(",") if entry.strip())


# IPv6 blocks whose last 32 bits are an IPv4 address that a translator or tunnel may deliver to.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052's well-known prefix
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291, deprecated: ::a.b.c.d
IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765: ::ffff:0:a.b.c.d
# RFC 8215's local-use NAT64 prefix: an operator's own translator, where the IPv4 address may sit at any of
# RFC 6052's positions. Never globally reachable, so refused whole.
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
ISATAP_INTERFACE = 0x0000_5EFE  # RFC 5214: an interface id of 0:5efe:a.b.c.d (or 200:5efe:... when global)
HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address that this IPv6 one may reach: IPv4-mapped, 6to4, both of Teredo's, and the last
    32 bits of NAT64, IPv4-compatible, SIIT and ISATAP addresses. Python's ``is_global`` calls several of
    these global whatever they carry (64:ff9b::7f00:1 is loopback through a NAT64 gateway)."""
    found = [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
    interface = (int(ip) >> 32) & 0xFFFF_FFFF
    if any(ip in net for net in (NAT64, IPV4_COMPATIBLE, IPV4_TRANSLATED)) or interface | 0x0200_0000 == (
        0x0200_0000 | ISATAP_INTERFACE
    ):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF))
    return found


def is_public(address: str) -> bool:
    """Globally routable: not loopback, private, shared (100.64.0.0/10), link-local, reserved, unspecified or
    multicast, and, for an IPv6 address that carries an IPv4 one, neither is that."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope id is not part of the address
    inside: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in NAT64_LOCAL:
            return False
        inside += embedded_ipv4(ip)
    return all(a.is_global and not a.is_multicast for a in inside)


def check_host(host: str) -> None:
    """A host the name lookup can take: an IP literal, or a name of LDH labels (IDNA already applied), each
    1 to 63 characters, 253 in all. UrlRefused otherwise: an empty label (``a..b``) or a label the IDNA codec
    refuses would otherwise fail deep inside the lookup, as an error no one expects."""
    if ":" in host:  # httpx has checked an IPv6 literal already; a scope id is ours to refuse
        if "%" in host:
            raise UrlRefused("an IPv6 address with a zone id is not allowed")
        return
    name = host[:-1] if host.endswith(".") else host  # one trailing dot: a fully qualified name
    if not name or len(name) > 253 or not all(HOST_LABEL.match(label) for label in name.split(".")):
        raise UrlRefused(f"not a valid host name: {host[:100]!r}")


def check_syntax(url: str) -> httpx.URL:
    """An absolute http(s) URL with a valid host and port; UrlRefused otherwise."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii").lower()  # IDNA-encoded by httpx
        parsed.host  # noqa: B018  decoding it back refuses A-labels that are not Punycode (xn--zz)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:  # ValueError: idna's and ascii's UnicodeErrors
        raise UrlRefused(f"not a valid URL: {str(url)[:100]!r}") from exc
    if parsed.scheme not in ("http", "https") or not host:
        raise UrlRefused(f"only absolute http and https URLs are allowed, not {str(url)[:100]!r}")
    check_host(host)
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise UrlRefused(f"not a valid port: {parsed.port}")
    return parsed


async def resolve(url: str, allowed: frozenset[str]) -> httpx.URL:
    """The URL with its host replaced by the address to connect to, after the guard's checks."""
    parsed = check_syntax(url)
    host, port = (
        parsed.raw_host.decode("ascii").lower(),
        parsed.port or (443 if parsed.scheme == "https" else 80),
    )
    try:
        lookup = asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        infos = await asyncio.wait_for(lookup, RESOLVE_TIMEOUT_S)
    except UnicodeError as exc:  # the lookup's own IDNA codec, stricter in places than ours
        raise UrlRefused(f"not a valid host name: {host[:100]!r}") from exc
    except (OSError, asyncio.TimeoutError) as exc:
        raise FetchFailed(f"cannot resolve {host}: {exc or 'no answer in time'}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise FetchFailed(f"{host} has no address")
    listed = host in allowed or f"{host}:{port}" in allowed
    if not listed and not all(is_public(a) for a in addresses):  # which address is not told: no probing
        raise UrlRefused(
            f"{host} resolves to a non-public address; list it in SEGSERVE_ALLOWED_URL_HOSTS to allow it"
        )
    return parsed.copy_with(host=addresses[0].split("%")[0], port=port)


def client(timeout: float) -> httpx.AsyncClient:
    """An HTTP client for guarded requests: no redirects, no proxies from the environment, bounded waits, and
    no kept connections: a pool keyed by address would let one host's TLS session serve another's name."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def deadline(timeout: float) -> float:
    """The longest one guarded request may take in all: name lookup, connect, send, answer."""
    return RESOLVE_TIMEOUT_S + 3 * timeout


async def request(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    allowed: frozenset[str],
    limit: int | None,
    *,
    content: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One guarded request: UrlRefused before any connection, FetchFailed (or TooLarge) after. The answer's
    body is read up to ``limit`` bytes (TooLarge past it), or not at all for None. Each step's timeout is the
    client's; the whole request is bounded too, so an answer that trickles in cannot hold it open."""
    timeout = http.timeout.read or 10.0
    try:
        return await asyncio.wait_for(
            _request(http, method, url, allowed, limit, content, headers), deadline(timeout)
        )
    except asyncio.TimeoutError as exc:
        raise FetchFailed(f"{httpx.URL(url).host}: no whole answer in {deadline(timeout):g} s") from exc


async def _request(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    allowed: frozenset[str],
    limit: int | None,
    content: bytes | None,
    headers: dict[str, str] | None,
) -> Answer:
    target = await resolve(url, allowed)
    original = httpx.URL(url)
    host_header = original.netloc.decode("ascii")  # IDNA-encoded, an IPv6 host in brackets, and the port
    extensions = {"sni_hostname": original.raw_host.decode("ascii")} if original.scheme == "https" else {}
    # Compressed answers are refused, not inflated: a few bytes of nested gzip could fill the memory.
    headers = {**(headers or {}), "Host": host_header, "Accept-Encoding": "identity"}
    try:
        async with http.stream(
            method,
            target,
            content=content,
            headers=headers,
            extensions=extensions,
        ) as response:
            body = bytearray()
            if limit is not None:
                if response.headers.get("content-encoding", "identity").lower() != "identity":
                    raise FetchFailed(
                        f"{original.host} answered with a Content-Encoding; identity was asked for"
                    )
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > limit:
                        raise TooLarge(f"the answer from {original.host} is over the limit of {limit} bytes")
            return Answer(response.status_code, response.headers, bytes(body))
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise FetchFailed(f"{original.host}: {type(exc).__name__}: {reason}") from exc
