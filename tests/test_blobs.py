"""The blob store on both of its backends: a local directory, and an S3 API served by a real server process
(Ceph's RADOS Gateway, tests/harness/s3.py), through the same client."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
import pytest

from gateway.jobs import Blobs, BlobStoreError, BlobStoreFull
from gateway.settings import Settings
from tests.harness.jobs import directory_blobs
from tests.harness.s3 import CephS3

ROOT = Path(__file__).resolve().parent.parent


def s3_blobs(ceph: CephS3, bucket: str, monkeypatch: pytest.MonkeyPatch, **overrides: str) -> Blobs:
    """A blob store on ``bucket``; the S3 client reads its credentials from the environment as it starts."""
    env = {**ceph.env(bucket), **overrides}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Blobs.from_settings(Settings.from_env(env))


def new_bucket(ceph: CephS3, purpose: str) -> str:
    return ceph.bucket(f"{purpose}-{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["directory", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Blobs:
    if request.param == "directory":
        return directory_blobs(tmp_path / "blobs")
    ceph: CephS3 = request.getfixturevalue("ceph")
    return s3_blobs(ceph, new_bucket(ceph, "blobs"), monkeypatch)


async def chunks(count: int, size: int = 256 * 1024, fail_at: int | None = None) -> AsyncIterator[bytes]:
    for n in range(count):
        if n == fail_at:
            raise ValueError("the body passed its limit")
        yield bytes([n % 256]) * size


async def test_blobs_round_trip_whole_and_streamed(blobs: Blobs) -> None:
    await blobs.put("masks/a.png", b"PNG bytes")
    assert await blobs.get("masks/a.png") == b"PNG bytes"
    # Over S3's part size: an upload in parts, read back in chunks.
    await blobs.put("inputs/big", chunks(48))
    stream = await blobs.stream("inputs/big")
    assert stream is not None and stream.size == 48 * 256 * 1024
    received = b"".join([chunk async for chunk in stream.chunks])
    assert received == b"".join([chunk async for chunk in chunks(48)])
    listed = {blob.name: blob.size async for blob in blobs.list("inputs/")}
    assert listed == {"inputs/big": 48 * 256 * 1024}
    await blobs.delete(["inputs/big", "masks/a.png", "masks/never-written.png"])  # a missing one is no error
    assert await blobs.get("inputs/big") is None and await blobs.stream("masks/a.png") is None
    assert [blob async for blob in blobs.list("")] == []


async def test_an_upload_cut_short_leaves_nothing(blobs: Blobs) -> None:
    with pytest.raises(ValueError, match="limit"):
        await blobs.put("inputs/cut", chunks(40, fail_at=30))
    assert await blobs.get("inputs/cut") is None


async def test_a_header_is_read_without_the_whole_blob(blobs: Blobs) -> None:
    await blobs.put("inputs/tiff", b"HEADER" + bytes(8 << 20) + b"TRAILER")
    with blobs.reader("inputs/tiff") as reader:  # what an image decoder does with a TIFF's last directory
        assert reader.read(6) == b"HEADER"
        reader.seek(-7, os.SEEK_END)
        assert reader.read() == b"TRAILER"


async def test_a_streamed_upload_holds_little_memory(blobs: Blobs) -> None:
    process = psutil.Process()
    await blobs.put("inputs/warm", chunks(4))
    before = process.memory_info().rss
    await blobs.put("inputs/large", chunks(256))  # 64 MiB
    grown = process.memory_info().rss - before
    assert grown < 24 << 20, f"a 64 MiB upload grew the process by {grown >> 20} MiB"


async def test_a_full_directory_refuses_new_inputs(tmp_path: Path) -> None:
    free = (await directory_blobs(tmp_path).free_bytes()) or 0
    nearly_full = directory_blobs(tmp_path, min_free_bytes=free - (1 << 20))
    await nearly_full.check_room(1000)
    with pytest.raises(BlobStoreFull, match="keeps"):
        await nearly_full.check_room(4 << 20)


async def test_signed_urls_read_a_blob_without_credentials(
    ceph: CephS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = s3_blobs(ceph, new_bucket(ceph, "signed"), monkeypatch)
    assert blobs.signs and not directory_blobs(Path("/tmp")).signs
    await blobs.put("masks/j.png", b"the mask")
    url = await blobs.sign("masks/j.png", 60)
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).content == b"the mask"
        tampered = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
        assert (await http.get(tampered)).status_code == 403  # the server checks the signature
        assert (await http.get(url.split("?")[0])).status_code == 403  # and wants one


async def test_health_says_when_the_store_is_unreachable_or_refuses_us(
    ceph: CephS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = new_bucket(ceph, "health")
    assert await s3_blobs(ceph, bucket, monkeypatch).health() == "ok"
    wrong = s3_blobs(ceph, bucket, monkeypatch, AWS_SECRET_ACCESS_KEY="wrong")
    assert (await wrong.health()).startswith("down")
    nowhere = s3_blobs(ceph, bucket, monkeypatch, SEGSERVE_BLOB_ENDPOINT="http://127.0.0.1:9")
    assert (await nowhere.health()).startswith("down")
    with pytest.raises(BlobStoreError):
        await nowhere.put("masks/x.png", b"x")
    assert (await s3_blobs(ceph, "no-such-bucket", monkeypatch).health()).startswith("down")


async def test_the_documented_lifecycle_rule_is_one_the_s3_api_takes(ceph: CephS3) -> None:
    """docs/storage.md's backstop rule, as written there, is accepted, and read back."""
    text = (ROOT / "docs" / "storage.md").read_text()
    rule = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    bucket = new_bucket(ceph, "lifecycle")
    client = ceph.client()
    await asyncio.to_thread(
        client.put_bucket_lifecycle_configuration, Bucket=bucket, LifecycleConfiguration=rule
    )
    shown = await asyncio.to_thread(client.get_bucket_lifecycle_configuration, Bucket=bucket)
    assert {r["ID"] for r in shown["Rules"]} == {r["ID"] for r in rule["Rules"]}
