"""Hostile bytes against the real gateway process (uvicorn, on a real Redis, no model server): deeply nested
JSON, malformed forms and multipart bodies, query strings and headers. Each gets a 4xx problem answer with a
code: no 500, no reset connection, and the gateway keeps answering."""

from __future__ import annotations

import base64
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app.compat import read_image_file, resolve_image_path
from gateway.app.errors import Problem
from tests.harness.images import encode, scene
from tests.harness.servers import GatewayServer, RedisServer

IMAGE = encode(scene(32, 24))
IMAGE_B64 = base64.b64encode(IMAGE).decode()
DEPTH = 100_000


@pytest.fixture(scope="module")
def gateway_process(
    job_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    """One gateway for the whole module, as a real one takes hostile requests one after another: after each
    test it must still answer (``http``). Starting one a test took most of the module's time."""
    with job_redis.client() as redis:
        redis.flushall()
    home = tmp_path_factory.mktemp("hostile")
    images = home / "images"
    images.mkdir()
    (images / "cat.jpg").write_bytes(IMAGE)
    env = {"SEGSERVE_IMAGE_ROOT": str(images)}
    with GatewayServer(job_redis, home / "blobs", home, env) as gateway:
        yield gateway


@pytest.fixture
def http(gateway_process: GatewayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_process.url, timeout=60) as client:
        yield client
        assert client.get("/healthz").status_code == 200, "the gateway stopped answering"


def assert_problem(answer: httpx.Response, *codes: str) -> None:
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"] == "application/problem+json", answer.text[:300]
    if codes:
        assert answer.json()["code"] in codes, answer.text[:300]


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


DEEP_BODIES = {
    "deep array": nested(DEPTH),
    "deep object": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "deep member": b'{"image": "' + IMAGE_B64.encode() + b'", "classes": ' + nested(DEPTH) + b"}",
    "deep member that parses": b'{"image": "' + IMAGE_B64.encode() + b'", "classes": ' + nested(500) + b"}",
    "deep threshold": b'{"image": "' + IMAGE_B64.encode() + b'", "threshold": ' + nested(500) + b"}",
    "deep class ids": b'{"image_path": "cat.jpg", "target_class_ids": ' + nested(DEPTH) + b"}",
    "deep class ids that parse": b'{"image_path": "cat.jpg", "target_class_ids": ' + nested(500) + b"}",
    "deep image path": b'{"image_path": ' + nested(500, b'"cat.jpg"') + b"}",
}


@pytest.mark.parametrize("path", ["/v1/jobs", "/predict"])
@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_deeply_nested_json_is_a_4xx(http: httpx.Client, path: str, body: bytes) -> None:
    answer = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert_problem(answer, "invalid_body", "invalid_parameter", "unknown_class")


def multipart(*parts: bytes, boundary: bytes = b"zz") -> bytes:
    return (
        b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts) + b"--" + boundary + b"--\r\n"
    )


def file_part(name: bytes, data: bytes, extra: bytes = b"") -> bytes:
    return (
        b'Content-Disposition: form-data; name="' + name + b'"; filename="a.jpg"\r\n' + extra + b"\r\n" + data
    )


def field_part(name: bytes, value: bytes) -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value


FORMS = {
    "no boundary": ("multipart/form-data", b"--zz\r\n\r\n"),
    "empty boundary": ("multipart/form-data; boundary=", b"----\r\n"),
    "boundary never closed": ("multipart/form-data; boundary=zz", b"--zz\r\n" + file_part(b"image", IMAGE)),
    "no part headers": ("multipart/form-data; boundary=zz", multipart(b"\r\n" + IMAGE)),
    "no disposition": ("multipart/form-data; boundary=zz", multipart(b"Content-Type: image/jpeg\r\n\r\n" + IMAGE)),
    "file not called image": ("multipart/form-data; boundary=zz", multipart(file_part(b"picture", IMAGE))),
    "image as a plain field": ("multipart/form-data; boundary=zz", multipart(field_part(b"image", IMAGE))),
    "two files": ("multipart/form-data; boundary=zz", multipart(file_part(b"image", IMAGE), file_part(b"x", IMAGE))),
    "too many fields": ("multipart/form-data; boundary=zz",
                        multipart(file_part(b"image", IMAGE), *(field_part(b"f%d" % i, b"1") for i in range(40)))),
    "a field of 2 MB": ("multipart/form-data; boundary=zz",
                        multipart(file_part(b"image", IMAGE), field_part(b"classes", b"cat," * 500_000))),
    "a header line of 100 kB": ("multipart/form-data; boundary=zz",
                                multipart(file_part(b"image", IMAGE, b"X-Pad: " + b"a" * 100_000 + b"\r\n"))),
    "bad threshold field": ("multipart/form-data; boundary=zz",
                            multipart(file_part(b"image", IMAGE), field_part(b"threshold", b"\xff\xfe"))),
    "non-UTF-8 classes": ("multipart/form-data; boundary=zz",
                          multipart(file_part(b"image", IMAGE), field_part(b"classes", b"\xff\xfe"))),
    "not an image": ("multipart/form-data; boundary=zz", multipart(file_part(b"image", b"\0" * 100))),
    "urlencoded form": ("application/x-www-form-urlencoded", b"image=" + IMAGE_B64.encode()),
    "lone surrogate": ("application/json", b'{"image": "\\ud800"}'),
    "a NUL in JSON": ("application/json", b'{"image": "\x00"}'),
    "a number past float": ("application/json", b'{"image": "' + IMAGE_B64.encode() + b'", "threshold": 1e999}'),
    "a huge integer": ("application/json", b'{"image": "' + IMAGE_B64.encode() + b'", "classes": [' + b"9" * 5000 + b"]}"),
}  # fmt: skip


@pytest.mark.parametrize(("content_type", "body"), FORMS.values(), ids=FORMS.keys())
def test_malformed_forms_and_bodies_are_a_4xx(http: httpx.Client, content_type: str, body: bytes) -> None:
    assert_problem(http.post("/v1/jobs", content=body, headers={"Content-Type": content_type}))


QUERIES = [
    "?threshold=%ZZ", "?threshold=%ff%fe", "?classes=%00", "?classes=%ff", "?model=%ff", "?overlay=%ff",
    "?classes=cat&classes=dog&classes=" + "x" * 4000, "?threshold=1e999", "?threshold=-0x1p-2",
    "?webhook=%ff", "?webhook=http%3A%2F%2F%5B%3A%3A1", "?webhook=http%3A%2F%2Fa..b%2F",
    "?webhook_events_filter=%ff", "?" + "&".join(f"k{i}=v" for i in range(5000)), "?&&&==&=&",
]  # fmt: skip


@pytest.mark.parametrize("query", QUERIES, ids=[q[:30] for q in QUERIES])
def test_hostile_query_strings_are_a_4xx(http: httpx.Client, query: str) -> None:
    answer = http.post(f"/v1/jobs{query}", content=IMAGE, headers={"Content-Type": "image/jpeg"})
    assert answer.status_code < 500, (query[:60], answer.text[:300])
    if answer.status_code >= 400:
        assert_problem(answer)


HEADERS = [
    {"async_mode": "\xff"}, {"Idempotency-Key": "\xff\xfe"}, {"Idempotency-Key": "\xa0"},
    {"Authorization": "Bearer \xff"}, {"Authorization": "Bearer " + "a" * 8000}, {"Authorization": "\xff"},
    {"Content-Type": "image/jpeg; " + "a=b;" * 2000}, {"Content-Type": "\xff/\xfe"},
    {"Content-Type": "multipart/form-data; boundary=" + "b" * 5000}, {"Last-Event-ID": "x" * 8000},
]  # fmt: skip
# Preferences are tried on a job that does not exist: a well-formed wait on a real one is served, 60 s at most.
PREFERENCES = ["wait=nan", "wait=-inf", "wait=1e999", "wait", "wait=" + "9" * 5000, ",,,;;;==", "wait=\xff"]


@pytest.mark.parametrize("headers", HEADERS, ids=[str(h)[:30] for h in HEADERS])
def test_hostile_headers_are_never_a_5xx(http: httpx.Client, headers: dict[str, str]) -> None:
    encoded = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in {"Content-Type": "image/jpeg", **headers}.items()
    ]
    for answer in (http.post("/v1/jobs", content=IMAGE, headers=encoded),
                   http.get("/v1/jobs/j_" + "0" * 32, headers=encoded)):  # fmt: skip
        assert answer.status_code < 500, (headers, answer.text[:300])
        if answer.status_code >= 400:
            assert_problem(answer)


@pytest.mark.parametrize("prefer", PREFERENCES, ids=[p[:20] for p in PREFERENCES])
def test_hostile_preferences_are_never_a_5xx(http: httpx.Client, prefer: str) -> None:
    answer = http.get("/v1/jobs/j_" + "0" * 32, headers=[(b"Prefer", prefer.encode("latin-1"))])
    assert_problem(answer, "job_not_found")


def raw_exchange(gateway: GatewayServer, request: bytes) -> bytes:
    """One request on a plain socket, and all the server sends back until it closes."""
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=30) as conn:
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def test_deep_json_on_the_wire_gets_an_answer_not_a_reset(gateway_process: GatewayServer) -> None:
    body = nested(DEPTH)
    for path in (b"/v1/jobs", b"/predict"):
        request = (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)) + body  # fmt: skip
        answer = raw_exchange(gateway_process, request)
        assert answer.startswith(b"HTTP/1.1 422 "), answer[:200]
        assert b'"code":"invalid_body"' in answer


MALFORMED_HTTP = {
    "Content-Length with a sign": b"Content-Length: +5\r\n\r\nabcde",
    "two Content-Lengths": b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    "a header without a colon": b"Content-Type image/jpeg\r\n\r\n",
    "a header of 64 kB": b"X-Pad: " + b"a" * (1 << 16) + b"\r\n\r\n",
    "chunked with a bad size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("head", MALFORMED_HTTP.values(), ids=MALFORMED_HTTP.keys())
def test_malformed_http_is_refused_by_the_server_with_a_4xx(
    gateway_process: GatewayServer, head: bytes
) -> None:
    """HTTP that does not parse never reaches the app (uvicorn answers it with a 400 and closes); what does
    parse gets the app's own 4xx."""
    answer = raw_exchange(
        gateway_process, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head
    )
    assert answer.startswith(b"HTTP/1.1 4"), answer[:200]
    with httpx.Client(base_url=gateway_process.url) as client:
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("digit", ["%C2%B2", "%D9%A3"], ids=["superscript two", "Arabic-Indic three"])
def test_only_ascii_digits_are_numbers(http: httpx.Client, digit: str) -> None:
    """Digits to ``str.isdigit`` that ``int`` refuses (a superscript) or reads (another script's): an unknown
    class, a bad page size."""
    submitted = http.post(f"/v1/jobs?classes={digit}", content=IMAGE, headers={"Content-Type": "image/jpeg"})
    assert_problem(submitted, "unknown_class")
    assert_problem(http.get(f"/v1/jobs?limit={digit}"), "invalid_parameter")


def test_the_webhook_secret_is_never_served_without_a_key(http: httpx.Client) -> None:
    """With no API keys, anyone who reaches the gateway would get the key that signs its deliveries."""
    answer = http.get("/v1/webhooks/secret")
    assert_problem(answer, "secret_needs_key")
    assert answer.status_code == 403 and "whsec_" not in answer.text


def test_predict_reads_only_regular_files_and_never_past_the_limit(
    gateway_process: GatewayServer, http: httpx.Client
) -> None:
    """A FIFO (which would hang a plain open), a device, a symlink out of the root, and a file over the limit:
    each a 4xx, and the gateway still answers."""
    root = Path(gateway_process.env["SEGSERVE_IMAGE_ROOT"])
    os.mkfifo(root / "fifo.jpg")
    os.mknod(root / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
    (root / "out.jpg").symlink_to("/etc/hostname")
    (root / "in.jpg").symlink_to(root / "cat.jpg")
    (root / "huge.jpg").write_bytes(IMAGE + b"\0" * (20 << 20))  # past SEGSERVE_MAX_BODY_BYTES
    for name, status, code in [("fifo.jpg", 404, "image_not_found"), ("zero.jpg", 404, "image_not_found"),
                               ("out.jpg", 403, "path_outside_root"), ("huge.jpg", 413, "body_too_large")]:  # fmt: skip
        answer = http.post("/predict", json={"image_path": name})
        assert answer.status_code == status, (name, answer.text)
        assert_problem(answer, code)
    assert http.post("/predict", json={"image_path": "in.jpg"}).json()["success"] is True


def test_a_file_swapped_for_a_symlink_or_grown_after_the_check_is_still_refused(tmp_path: Path) -> None:
    """The checks of image_path and the read are separate steps; the read itself refuses what a swap could
    bring: a symlink as the last step (O_NOFOLLOW), a FIFO (O_NONBLOCK, then fstat), and bytes past the limit
    however large the file was when it was checked."""
    (tmp_path / "real.jpg").write_bytes(IMAGE)
    checked = tmp_path / "checked.jpg"
    checked.write_bytes(IMAGE)
    resolved = resolve_image_path(str(tmp_path), "checked.jpg")
    checked.unlink()
    checked.symlink_to(tmp_path / "real.jpg")  # swapped after the check
    with pytest.raises(Problem) as refused:
        read_image_file(resolved, 1 << 20)
    assert refused.value.code == "path_outside_root"
    checked.unlink()
    os.mkfifo(checked)
    with pytest.raises(Problem) as refused:
        read_image_file(resolved, 1 << 20)
    assert refused.value.code == "image_not_found"
    checked.unlink()
    checked.write_bytes(IMAGE)
    with checked.open("ab") as growing:
        growing.write(b"\0" * 4096)  # grown after the check
    with pytest.raises(Problem) as refused:
        read_image_file(resolved, len(IMAGE) + 100)
    assert refused.value.code == "body_too_large"
