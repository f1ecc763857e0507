"""The URL guard against every hostile address and host name we know of: IPv6 forms that carry a private
IPv4 address, names the IDNA codecs refuse, empty labels, bad ports and IPv6 literals. Each is refused before
any connection, at submission as a 422 with a code (never a 500), and again at each webhook delivery."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from gateway import urls
from tests.harness.images import encode, scene
from tests.harness.processes import LOOPBACK_CLIENT, free_port
from tests.harness.servers import WEBHOOK_SECRET, RedisServer

IMAGE_B64 = base64.b64encode(encode(scene(32, 24))).decode()

# Each carries an IPv4 address that must not be reached; Python's is_global calls most of them global.
EMBEDDED = {
    "NAT64 metadata": "64:ff9b::a9fe:a9fe",  # 169.254.169.254 through the well-known NAT64 prefix
    "NAT64 loopback": "64:ff9b::7f00:1",
    "NAT64 local-use": "64:ff9b:1::a00:1",  # RFC 8215: 10.0.0.1
    "NAT64 local-use, RFC 6052 /48 layout": "64:ff9b:1:a00:1::",
    "IPv4-compatible hex": "::7f00:1",
    "IPv4-compatible dotted": "::127.0.0.1",
    "IPv4-mapped": "::ffff:127.0.0.1",
    "IPv4-mapped private": "::ffff:10.0.0.1",
    "SIIT": "::ffff:0:7f00:1",
    "SIIT metadata": "::ffff:0:169.254.169.254",
    "6to4 loopback": "2002:7f00:1::",
    "6to4 private": "2002:a00:1::1",
    "Teredo, private server": "2001:0:a00:1::1",
    "Teredo, loopback client": "2001:0:808:808:0:0:80ff:fffe",  # the client is stored inverted
    "ISATAP private": "2a00:1450::5efe:a00:1",
    "ISATAP global-bit private": "2a00:1450::200:5efe:c0a8:1",
}
# Public addresses in the same forms pass: the guard judges what is inside, it does not ban the forms.
PUBLIC = ["64:ff9b::808:808", "::ffff:8.8.8.8", "2002:808:808::1", "2a00:1450::200:5efe:808:808"]
BAD_HOSTS = {
    "empty label": "http://a..b/",
    "leading empty label": "http://.example.com/",
    "label over 63": f"http://{'a' * 64}.com/",
    "name over 253": "http://" + ".".join(["a" * 60] * 5) + "/",
    "percent in a name": "http://%41.com/",
    "bad A-label": "http://xn--zz.com/",
    "empty A-label": "http://xn--/",
    "joiner IDNA refuses": "http://ab\u200d.com/",
    "unclosed IPv6 literal": "http://[::1/",
    "bad IPv6 literal": "http://[zz::1]/",
    "IPv6 zone id": "http://[fe80::1%25eth0]/",
    "port 0": "http://example.com:0/",
    "port over 65535": "http://example.com:99999/",
    "negative port": "http://example.com:-1/",
    "port not a number": "http://example.com:http/",
    "no host": "http:///path",
    "not http": "gopher://example.com/",
}


@pytest.mark.parametrize("address", EMBEDDED.values(), ids=EMBEDDED.keys())
async def test_embedded_ipv4_is_judged_by_what_it_carries(address: str) -> None:
    assert not urls.is_public(address)
    with pytest.raises(urls.UrlRefused):
        await urls.resolve(f"http://[{address}]:8080/", frozenset())


@pytest.mark.parametrize("address", PUBLIC)
def test_public_ipv4_inside_those_forms_passes(address: str) -> None:
    assert urls.is_public(address)


@pytest.mark.parametrize("url", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
async def test_bad_host_names_and_ports_are_refused_before_any_lookup(url: str) -> None:
    with pytest.raises(urls.UrlRefused):
        await urls.resolve(url, frozenset())


@pytest.fixture
def app_client(
    fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[TestClient]:
    """The gateway in-process on a real Redis, with webhooks on."""
    monkeypatch.setenv("SEGSERVE_REDIS_URL", fresh_redis.url)
    monkeypatch.setenv("SEGSERVE_BLOB_URL", str(tmp_path / "blobs"))
    monkeypatch.setenv("SEGSERVE_TORCHSERVE_MANAGEMENT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("SEGSERVE_WEBHOOK_SECRET", WEBHOOK_SECRET)
    from gateway.app import app

    with TestClient(app, raise_server_exceptions=False, client=LOOPBACK_CLIENT) as client:
        yield client


def test_submissions_with_embedded_ipv4_are_refused_before_a_connection(app_client: TestClient) -> None:
    for address in EMBEDDED.values():
        url = f"http://[{address}]:9/hook"
        for body in ({"image": IMAGE_B64, "webhook": url}, {"image_url": url}):
            answer = app_client.post("/v1/jobs", json=body)
            # url_not_allowed, not fetch_failed: no connection was tried
            assert answer.status_code == 422 and answer.json()["code"] == "url_not_allowed", (
                body,
                answer.text,
            )


def test_hostile_host_names_get_a_4xx_with_a_code(app_client: TestClient) -> None:
    hostile = [*BAD_HOSTS.values(), "http://مثال١.com/", "http://xn--mgbh0fb7l.com/", "http://a.b.c.d.e.f./"]
    for url in hostile:
        for body in ({"image": IMAGE_B64, "webhook": url}, {"image_url": url}):
            answer = app_client.post("/v1/jobs", json=body)
            assert answer.status_code == 422, (body, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
            assert answer.json()["code"] in ("url_not_allowed", "fetch_failed"), (body, answer.text)
