"""The stack's memory bounds under `segserve up`, on both blob backends (a directory, and a real S3 server):
Redis holds metadata only, however large the images; a store that fills up refuses new work and loses nothing
it accepted; and the gateway keeps its ceiling while many clients fetch a large result."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import redis
from PIL import Image

from tests.harness.images import encode
from tests.harness.processes import ROOT, free_port
from tests.harness.s3 import CephS3
from tests.harness.servers import side_by_side_env, start_segserve_up

MiB = 1 << 20
STORE_BYTES = 900 * MiB  # the blob directory: a filesystem of its own this large
RESERVE = 64 * MiB  # the free space it keeps (SEGSERVE_BLOB_MIN_FREE_BYTES)
GATEWAY_CEILING = 300 * MiB


@dataclass
class Up:
    """A `segserve up` stack: its URL, its Redis, its gateway process."""

    url: str
    redis_url: str
    process: subprocess.Popen[bytes]
    backend: str

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)

    def gateway(self) -> psutil.Process:
        (gateway,) = [
            p
            for p in psutil.Process(self.process.pid).children()
            if "gateway.app:app" in " ".join(p.cmdline())
        ]
        return gateway


@pytest.fixture(scope="module", params=["directory", "s3"])
def up(
    request: pytest.FixtureRequest, model_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Up]:
    home = tmp_path_factory.mktemp("up")
    env = side_by_side_env(home / "state")
    env |= {
        "SEGSERVE_MODEL_STORE": str(model_store),
        "SEGSERVE_TORCHSERVE_CONFIG": str(ROOT / "config.properties"),
    }
    mounted = None
    if request.param == "directory":
        mounted = home / "blobs"  # a filesystem of its own, so that it can fill up
        mounted.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={STORE_BYTES}", "tmpfs", str(mounted)], check=True
        )
        env |= {"SEGSERVE_BLOB_URL": str(mounted), "SEGSERVE_BLOB_MIN_FREE_BYTES": str(RESERVE)}
    else:
        ceph: CephS3 = request.getfixturevalue("ceph")
        env |= ceph.env(ceph.bucket(f"up-{uuid.uuid4().hex[:12]}"))
        env["SEGSERVE_MAX_QUEUED_BYTES"] = str(STORE_BYTES - RESERVE)  # a bucket never fills: the budget does
    port = free_port()
    process, _ = start_segserve_up(home, env, port)
    try:
        yield Up(f"http://127.0.0.1:{port}", env["SEGSERVE_REDIS_URL"], process, request.param)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        if mounted is not None:
            subprocess.run(["umount", "-l", str(mounted)], check=False)


def textured(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A photo-like picture: gradients and grain, so that its overlay is as large as a photo's."""
    rows, columns = np.mgrid[0:height, 0:width]
    gradients = np.stack(
        [columns * 255 / width, rows * 255 / height, (rows + columns) * 127 / (width + height)], -1
    )
    grain = np.random.default_rng(0).normal(0, 18, (height, width, 3))
    pixels = Image.fromarray(np.clip(gradients + grain, 0, 255).astype(np.uint8))
    return encode(pixels, fmt, **({"quality": 85} if fmt == "JPEG" else {}))


def large_png(megabytes: float) -> bytes:
    """A PNG file this large: a 1280x960 picture, and after its pixels a private chunk (as cameras and editors
    keep their own data) that decoders skip. Its bytes make it large, which is what Redis and the stores see;
    its pixels stay cheap to segment, so that forty of them run in seconds."""
    picture = textured(1280, 960, "PNG")
    padding = os.urandom(int(megabytes * 1e6) - len(picture))
    chunk = struct.pack(">I", len(padding)) + b"sgPd" + padding
    chunk += struct.pack(">I", zlib.crc32(b"sgPd" + padding))
    end = picture.rindex(b"IEND") - 4  # the IEND chunk's length field
    return picture[:end] + chunk + picture[end:]


def wait_all(client: httpx.Client, ids: list[str]) -> dict[str, str]:
    statuses = {}
    for job_id in ids:
        job = client.get(f"/v1/jobs/{job_id}").json()
        while job["status"] in ("queued", "running"):
            job = client.get(f"/v1/jobs/{job_id}", headers={"Prefer": "wait=30"}).json()
        statuses[job_id] = job["status"] if job["status"] != "failed" else job["error"]["code"]
    return statuses


def test_a_full_store_refuses_new_work_and_redis_holds_only_metadata(up: Up) -> None:
    """20 MB images until the store refuses one: at least 40 accepted, Redis grown by a few MB at most while
    they wait and after they end, the refusal a 429 or 503 with a code and Retry-After, every accepted job
    succeeded, exactly once."""
    image = large_png(20)
    accepted: list[str] = []
    refusals: list[httpx.Response] = []
    lock, full = threading.Lock(), threading.Event()
    with up.redis() as r, httpx.Client(base_url=up.url, timeout=120) as client:
        before = int(r.info("memory")["used_memory"])
        grown_while_waiting = 0

        def submit_until_full(_: int) -> None:
            """Sixteen clients at once, faster than the workers drain the queue, so that it fills."""
            nonlocal grown_while_waiting
            with httpx.Client(base_url=up.url, timeout=120) as own:
                while not full.is_set() and len(accepted) < 400:
                    answer = own.post("/v1/jobs", content=image, headers={"Content-Type": "image/png"})
                    with lock:
                        if answer.status_code != 202:
                            refusals.append(answer)
                            full.set()
                            continue
                        accepted.append(answer.json()["id"])
                        if len(accepted) == 40:
                            grown_while_waiting = int(r.info("memory")["used_memory"]) - before

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(submit_until_full, range(16)))
        assert refusals and len(accepted) >= 40, (len(accepted), refusals)
        refusal = refusals[0]
        code = "blob_store_full" if up.backend == "directory" else "queue_bytes_full"
        assert refusal.status_code in (429, 503) and refusal.json()["code"] == code, refusal.text
        assert refusal.headers["retry-after"].isdigit()
        statuses = wait_all(client, accepted)
        assert set(statuses.values()) == {"succeeded"}, statuses
        assert all(client.get(f"/v1/jobs/{i}").json()["attempts"] == 1 for i in accepted)
        grown_after = int(r.info("memory")["used_memory"]) - before
    assert grown_while_waiting < 4 * MiB, (
        f"Redis grew by {grown_while_waiting / MiB:.1f} MB with 40 images waiting"
    )
    assert grown_after < 4 * MiB, f"Redis grew by {grown_after / MiB:.1f} MB once they ended"
    print(
        f"{up.backend}: {len(accepted)} accepted, Redis +{grown_while_waiting / MiB:.2f} MB waiting, "
        f"+{grown_after / MiB:.2f} MB after"
    )


def test_sixteen_clients_fetching_a_25mp_overlay_keep_the_gateway_under_its_ceiling(up: Up) -> None:
    picture = textured(5000, 5000)
    with httpx.Client(base_url=up.url, timeout=300) as client:
        job = client.post(
            "/v1/jobs?overlay=true", content=picture, headers={"Content-Type": "image/jpeg"}
        ).json()
        (status,) = wait_all(client, [job["id"]]).values()
        assert status == "succeeded"
    gateway = up.gateway()
    peak = gateway.memory_info().rss
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not sampling.is_set():
            peak = max(peak, gateway.memory_info().rss)
            time.sleep(0.02)

    def fetch(_: int) -> tuple[int, int]:
        with httpx.Client(base_url=up.url, timeout=300, follow_redirects=True) as client:
            answer = client.get(f"/v1/jobs/{job['id']}/overlay.png")
            return len(answer.content), int(answer.headers["content-length"])

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            sizes = list(pool.map(fetch, range(16)))
    finally:
        sampling.set()
        sampler.join()
    assert all(received == declared > 20 * MiB for received, declared in sizes), sizes
    assert peak < GATEWAY_CEILING, f"the gateway reached {peak / MiB:.0f} MB"
    print(f"{up.backend}: 16 overlays of {sizes[0][0] / MiB:.0f} MB, gateway peak {peak / MiB:.0f} MB")
