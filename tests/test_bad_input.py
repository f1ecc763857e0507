"""Bad input gets a clear 4xx or a failed job with a code, loses nothing, and the next good job still succeeds."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.harness.images import encode, scene
from tests.harness.servers import Stack

GOOD = encode(scene(64, 48))


def post(
    client: httpx.Client, body: bytes, content_type: str = "image/jpeg", **kwargs: object
) -> httpx.Response:
    return client.post(
        "/v1/jobs", content=body, headers={"Content-Type": content_type, "Prefer": "wait=30"}, **kwargs
    )  # type: ignore[arg-type]


def animated(fmt: str) -> bytes:
    frames = [scene(48, 32, seed=i) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def sixteen_bit_png() -> bytes:
    grey = (np.asarray(scene(48, 32).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    return encode(Image.fromarray(grey), "PNG")


CASES: list[tuple[str, Callable[[], tuple[bytes, str]], int, str]] = [
    # name, body and content type, HTTP status, code (of the problem, or of the failed job when 200)
    ("empty body", lambda: (b"", "image/jpeg"), 415, "not_an_image"),
    ("wrong content type", lambda: (GOOD, "text/csv"), 415, "unsupported_media_type"),
    ("non-image bytes", lambda: (b"\x00\x01 definitely not an image" * 10, "image/png"), 415, "not_an_image"),
    ("truncated JPEG", lambda: (GOOD[: len(GOOD) // 2], "image/jpeg"), 200, "invalid_image"),
    (
        "PNG decompression bomb",
        lambda: (encode(Image.new("1", (30000, 30000)), "PNG"), "image/png"),
        422,
        "too_many_pixels",
    ),
    ("GIF", lambda: (animated("GIF"), "image/png"), 415, "unsupported_image_type"),
]
WORKING: list[tuple[str, Callable[[], bytes]]] = [
    ("1x1", lambda: encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
    ("CMYK JPEG", lambda: encode(scene(48, 32).convert("CMYK"), "JPEG")),
    ("16-bit PNG", sixteen_bit_png),
    ("animated WebP", lambda: animated("WEBP")),
    ("animated PNG", lambda: animated("PNG")),
]


@pytest.fixture
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c
        assert post(c, GOOD).json()["status"] == "succeeded", "the next good job failed"


@pytest.mark.parametrize(("name", "make", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_rejected_or_failed_with_a_code(
    api: httpx.Client, name: str, make: Callable[[], tuple[bytes, str]], status: int, code: str
) -> None:
    body, content_type = make()
    response = post(api, body, content_type)
    assert response.status_code == status, response.text
    answer = response.json()
    if status == 200:
        assert answer["status"] == "failed" and answer["error"]["code"] == code
    else:
        assert response.headers["content-type"] == "application/problem+json"
        assert answer["code"] == code


@pytest.mark.parametrize(("name", "make"), WORKING, ids=[c[0] for c in WORKING])
def test_unusual_but_valid_images_succeed(api: httpx.Client, name: str, make: Callable[[], bytes]) -> None:
    body = make()
    answer = post(api, body, "image/png").json()
    assert answer["status"] == "succeeded", answer
    width, height = Image.open(io.BytesIO(body)).size
    assert (answer["result"]["width"], answer["result"]["height"]) == (width, height)


def test_malformed_bodies(api: httpx.Client) -> None:
    for content_type, body in (
        (
            "multipart/form-data; boundary=zz",
            b'--zz\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc',
        ),
        ("multipart/form-data", b"no boundary at all"),
        ("application/json", b'{"image": 5}'),
        ("application/json", b"[1, 2, 3]"),
        ("application/json", json.dumps({"image": "aGVsbG8=="}).encode()),
        ("application/json", json.dumps({"image": "%%%"}).encode()),
    ):
        response = api.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
        assert 400 <= response.status_code < 500, (content_type, body, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_parameters_and_headers(api: httpx.Client) -> None:
    for query in (
        "?threshold=NaN",
        "?threshold=-1",
        "?threshold=2",
        "?threshold=inf",
        "?classes=unicorn",
        "?classes=99",
        "?model=%00",
        "?classes=" + "cat," * 5000,
    ):
        response = api.post(f"/v1/jobs{query}", content=GOOD, headers={"Content-Type": "image/jpeg"})
        assert response.status_code in (404, 414, 422), (query[:40], response.text)
    clamped = api.post(
        "/v1/jobs", content=GOOD, headers={"Content-Type": "image/jpeg", "Prefer": "wait=99999"}
    )
    assert clamped.status_code == 200 and clamped.headers["preference-applied"] == "wait=60"
    for job_id in ("☃", "j_" + "0" * 10_000, "../../etc/passwd", "j_ZZZZ"):
        response = api.get(f"/v1/jobs/{job_id}")
        assert response.status_code in (404, 414), job_id
    idempotency = api.post(
        "/v1/jobs", content=GOOD, headers={"Content-Type": "image/jpeg", "Idempotency-Key": "k" * 300}
    )
    assert idempotency.status_code == 422


def test_100_mb_body_is_refused_while_streaming(api: httpx.Client, stack: Stack) -> None:
    assert stack.gateway is not None
    gateway = psutil.Process(stack.gateway.pid)
    before = gateway.memory_info().rss

    def body() -> Iterator[bytes]:
        chunk = b"\xff" * (1 << 20)
        for _ in range(100):
            yield chunk

    try:
        response = api.post("/v1/jobs", content=body(), headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # the gateway may close the connection while we are still sending: refused either way
    assert gateway.memory_info().rss - before < 40 << 20, "the gateway's memory grew with the body"
