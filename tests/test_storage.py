"""Where the gateway puts images and what it answers when a store fills up, in-process (Starlette's TestClient
runs its lifespan) against a real Redis and both blob backends: a directory, and a real S3 server (Ceph's RADOS
Gateway). Jobs are completed through the job store, as a worker completes them."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from starlette.testclient import TestClient

from gateway.jobs import JobStore, Outcome, Result, keys
from gateway.settings import Settings
from tests.harness.images import encode, scene
from tests.harness.processes import LOOPBACK_CLIENT
from tests.harness.s3 import CephS3
from tests.harness.servers import RedisServer

JPEG = {"Content-Type": "image/jpeg"}
RESULT = Result(640, 480, [{"id": 0, "name": "__background__", "pixels": 307200, "fraction": 1.0}])
App = Callable[..., TestClient]


@pytest.fixture(params=["directory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The settings of a blob store: a directory, or a bucket of its own on the S3 server."""
    if request.param == "directory":
        return {"SEGSERVE_BLOB_URL": str(tmp_path / "blobs")}
    ceph: CephS3 = request.getfixturevalue("ceph")
    return ceph.env(ceph.bucket(f"storage-{uuid.uuid4().hex[:12]}"))


@pytest.fixture
def app(fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    """``app(**settings)``: the gateway in-process with these settings (a blob store's among them)."""
    from gateway.app import app as gateway

    monkeypatch.setenv("SEGSERVE_REDIS_URL", fresh_redis.url)
    clients: list[TestClient] = []

    def start(**env: str) -> TestClient:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        clients.append(TestClient(gateway, client=LOOPBACK_CLIENT).__enter__())
        return clients[-1]

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def store_of(redis: RedisServer) -> JobStore:
    from arq.connections import ArqRedis

    return JobStore.from_settings(ArqRedis.from_url(redis.url), Settings.from_env())


def noise(width: int, height: int) -> bytes:
    """A PNG as large as its pixels: noise does not compress."""
    return encode(
        Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)), "PNG", compress_level=0
    )


def used_memory(redis: RedisServer) -> int:
    with redis.client() as client:
        return int(client.info("memory")["used_memory"])


def test_redis_keeps_metadata_and_the_blob_store_the_images(
    app: App, backend: dict[str, str], fresh_redis: RedisServer
) -> None:
    api = app(**backend)
    image = noise(700, 500)  # ~1 MB
    api.post("/v1/jobs", content=encode(scene(32, 24)), headers=JPEG)  # Redis loads the scripts: not per job
    before = used_memory(fresh_redis)
    sent = [
        api.post("/v1/jobs", content=image, headers={"Content-Type": "image/png"}),
        api.post("/v1/jobs", files={"image": ("a.png", image, "image/png")}),
        api.post("/v1/jobs", json={"image": base64.b64encode(image).decode()}),
    ] + [api.post("/v1/jobs", content=image, headers={"Content-Type": "image/png"}) for _ in range(7)]
    assert [r.status_code for r in sent] == [202] * 10, [r.text for r in sent]
    grown = used_memory(fresh_redis) - before
    assert grown < 64 << 10, f"10 jobs of a 1 MB image grew Redis by {grown} bytes"

    async def check() -> None:
        store = store_of(fresh_redis)
        for answer in sent:
            job_id = answer.json()["id"]
            assert (
                await store.blobs.get(keys.input_blob(job_id)) == image
            )  # every way in stores the same bytes
        assert await store.pending_bytes() == 10 * len(image) + len(encode(scene(32, 24)))
        await store.redis.aclose()

    asyncio.run(check())


def test_results_stream_from_the_blob_store(
    app: App, backend: dict[str, str], fresh_redis: RedisServer
) -> None:
    api = app(**backend)
    job = api.post("/v1/jobs?overlay=true", content=encode(scene()), headers=JPEG).json()
    mask, overlay = encode(Image.new("P", (640, 480)), "PNG"), encode(scene(), "PNG")
    complete(fresh_redis, job["id"], mask, overlay)
    assert api.get(f"/v1/jobs/{job['id']}/mask.png").content == mask
    shown = api.get(f"/v1/jobs/{job['id']}/overlay.png")
    assert shown.content == overlay and shown.headers["content-length"] == str(len(overlay))
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204

    async def gone() -> None:
        store = store_of(fresh_redis)
        assert [await store.blobs.get(name) for name in keys.blobs_of(job["id"])] == [None, None, None]
        await store.redis.aclose()

    asyncio.run(gone())


def test_presigned_results_skip_the_gateway(ceph: CephS3, app: App, fresh_redis: RedisServer) -> None:
    api = app(**ceph.env(ceph.bucket(f"presign-{uuid.uuid4().hex[:12]}")), SEGSERVE_BLOB_PRESIGN_SECONDS="60")
    job = api.post("/v1/jobs", content=encode(scene()), headers=JPEG).json()
    mask = encode(Image.new("P", (640, 480)), "PNG")
    complete(fresh_redis, job["id"], mask, None)
    redirect = api.get(f"/v1/jobs/{job['id']}/mask.png", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"].startswith(ceph.endpoint)
    assert redirect.headers["cache-control"] == "no-store"
    import httpx

    assert httpx.get(redirect.headers["location"]).content == mask  # from the bucket, with no credentials


def test_a_tiff_whose_header_ends_the_file_is_checked_from_the_blob(
    app: App, backend: dict[str, str]
) -> None:
    """A TIFF may keep its image directory after the pixels, past the bytes the gateway holds: the header
    is then read from the stored blob, as far as needed."""
    api = app(**backend)
    readable = tiff_with_trailing_directory(1600, 1000)  # 1.6 MB: its directory is past the first MiB
    answer = api.post("/v1/jobs", content=readable, headers={"Content-Type": "image/tiff"})
    assert answer.status_code == 202, answer.text
    too_many = tiff_with_trailing_directory(6000, 5000)  # 30 MP, over SEGSERVE_MAX_PIXELS (~30 MB)
    refused = app(SEGSERVE_MAX_BODY_BYTES=str(64 << 20)).post(
        "/v1/jobs", content=too_many, headers={"Content-Type": "image/tiff"}
    )
    assert refused.status_code == 422 and refused.json()["code"] == "too_many_pixels"


def tiff_with_trailing_directory(width: int, height: int) -> bytes:
    """An 8-bit greyscale TIFF: header, pixels, then its one image directory at the very end."""
    pixels = bytes(width * height)
    directory_at = 8 + len(pixels)
    short, long = 3, 4
    tags = [
        (256, long, width),
        (257, long, height),
        (258, short, 8),
        (259, short, 1),
        (262, short, 1),
        (273, long, 8),
        (277, short, 1),
        (278, long, height),
        (279, long, len(pixels)),
    ]
    directory = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        inline = struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, 1) + inline
    return struct.pack("<2sHI", b"II", 42, directory_at) + pixels + directory + struct.pack("<I", 0)


def test_a_full_store_refuses_new_work_with_a_code_and_keeps_what_it_accepted(
    app: App, fresh_redis: RedisServer, backend: dict[str, str]
) -> None:
    image = encode(scene())
    api = app(**backend, SEGSERVE_MAX_QUEUED_BYTES=str(2 * len(image)))
    accepted = [api.post("/v1/jobs", content=image, headers=JPEG) for _ in range(2)]
    assert [a.status_code for a in accepted] == [202, 202]
    refused = api.post("/v1/jobs", content=image, headers=JPEG)
    assert refused.status_code == 429 and refused.json()["code"] == "queue_bytes_full"
    assert refused.headers["retry-after"].isdigit()
    if "SEGSERVE_BLOB_ENDPOINT" not in backend:  # a directory: its free space is a bound too
        free = (
            os.statvfs(backend["SEGSERVE_BLOB_URL"]).f_bavail
            * os.statvfs(backend["SEGSERVE_BLOB_URL"]).f_frsize
        )
        nearly = app(SEGSERVE_BLOB_MIN_FREE_BYTES=str(free - len(image) // 2))
        full = nearly.post("/v1/jobs", content=image, headers=JPEG)
        assert full.status_code == 503 and full.json()["code"] == "blob_store_full", full.text
        assert full.headers["retry-after"].isdigit()
    for answer in accepted:  # nothing accepted was lost to the refusals
        job = api.get(f"/v1/jobs/{answer.json()['id']}").json()
        assert job["status"] == "queued"


def test_a_full_redis_answers_503_and_still_serves_reads(
    app: App, fresh_redis: RedisServer, tmp_path: Path
) -> None:
    api = app(SEGSERVE_BLOB_URL=str(tmp_path / "blobs"))
    job = api.post("/v1/jobs", content=encode(scene(32, 24)), headers=JPEG).json()
    with fresh_redis.client() as client:
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) // 2)
        try:
            full = api.post("/v1/jobs", content=encode(scene(32, 24)), headers=JPEG)
            assert full.status_code == 503 and full.json()["code"] == "job_store_full", full.text
            assert full.headers["retry-after"].isdigit()
            assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"
            assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
            retried = api.post(f"/v1/jobs/{job['id']}/retry")
            assert retried.status_code == 503 and retried.json()["code"] == "job_store_full"
        finally:
            client.config_set("maxmemory", 0)


def test_a_blob_store_that_does_not_answer_is_a_503(app: App, ceph: CephS3) -> None:
    api = app(
        **{
            **ceph.env("anywhere"),
            "SEGSERVE_BLOB_ENDPOINT": "http://127.0.0.1:9",
            "SEGSERVE_BLOB_TIMEOUT": "2",
        }
    )
    refused = api.post("/v1/jobs", content=encode(scene(32, 24)), headers=JPEG)
    assert refused.status_code == 503 and refused.json()["code"] == "blob_store_unavailable", refused.text
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["checks"]["blobs"].startswith("down")


def complete(redis: RedisServer, job_id: str, mask: bytes, overlay: bytes | None) -> None:
    async def run() -> None:
        store = store_of(redis)
        started = await store.start(job_id, deadline_ms=4e12)
        assert started is not None
        await store.complete(started, Outcome.succeeded(RESULT, mask, {}, overlay))
        await store.redis.aclose()

    asyncio.run(run())
