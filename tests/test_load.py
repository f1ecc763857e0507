"""2,000 jobs from 50 concurrent clients, good and bad images mixed: every good one succeeds, every bad
one is refused or fails with its code, nothing answers 5xx, and Redis keeps no input it no longer needs.

A quarter of the jobs are good: each costs a full forward pass on this 2-core CPU, and the rest are what
the load is about (bad input interleaved with good)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from tests.conftest import Stack, encode, scene

JOBS, CLIENTS = 2000, 50


def test_mixed_load(isolated: Stack) -> None:
    good = [encode(scene(48 + i, 36, seed=i)) for i in range(8)]
    larger = [encode(scene(300, 200, seed=i)) for i in range(8)]
    truncated = [whole[: len(whole) * 2 // 3] for whole in larger]  # the header survives, the pixels do not
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")
    kinds = (
        [("good", lambda i: (good[i % 8], ""), 200, None)] * 500
        + [("not an image", lambda i: (b"%PDF-1.4 " + bytes([i % 256]) * 64, ""), 415, "not_an_image")] * 500
        + [("truncated", lambda i: (truncated[i % 8], ""), 200, "invalid_image")] * 500
        + [("bomb", lambda i: (bomb, ""), 422, "too_many_pixels")] * 250
        + [("bad threshold", lambda i: (good[0], "?threshold=7"), 422, "invalid_parameter")] * 250
    )
    assert len(kinds) == JOBS
    random.Random(0).shuffle(kinds)
    counter = itertools.count()

    def one(kind: tuple) -> tuple[str, int, str | None]:  # type: ignore[type-arg]
        name, make, _, _ = kind
        body, query = make(next(counter))
        with httpx.Client(base_url=isolated.url, timeout=120) as client:
            response = client.post(f"/v1/jobs{query}", content=body, headers={"Content-Type": "image/jpeg"})
            if response.status_code != 202:
                return name, response.status_code, response.json().get("code")
            job = response.json()
            while job["status"] in ("queued", "running"):
                job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
            return name, 200, job["status"] if job["status"] == "succeeded" else job["error"]["code"]

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(one, kinds))

    tally = Counter(outcomes)
    assert not [o for o in outcomes if o[1] >= 500], tally
    for (name, _, _, code), (status, got) in zip(kinds, ((o[1], o[2]) for o in outcomes), strict=True):
        expected_status = next(k[2] for k in kinds if k[0] == name)
        assert status == expected_status, (name, status, got)
        assert got == (code or "succeeded"), (name, got)
    assert tally[("good", 200, "succeeded")] == 500

    with isolated.redis.client(db=int(isolated.env["SEGSERVE_REDIS_URL"].rsplit("/", 1)[1])) as redis:
        inputs = len(redis.keys("segserve:input:*"))
        queue = redis.zcard("arq:queue")
        used = int(redis.info("memory")["used_memory"])
    assert inputs == 500, (
        "inputs of failed jobs must be freed; succeeded ones stay for overlay.png until they expire"
    )
    assert queue == 0
    assert used < 64 << 20, f"Redis holds {used / 2**20:.0f} MB after the load"
