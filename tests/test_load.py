"""Mixed load from 50 concurrent clients for a fixed time, good and bad images interleaved: every good job
succeeds, every bad one is refused or fails with its code, nothing answers 5xx, and the blob store keeps no
input it does not need.

The load is bounded by time, not count, so it means the same on a slow machine: it sends for SECONDS, and
each client then waits for its own last job (generously bounded by the per-test timeout)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from tests.harness.images import encode, scene
from tests.harness.servers import Stack

SECONDS, CLIENTS = 30, 50
Kind = tuple[str, Callable[[int], tuple[bytes, str]], int, str | None]


def test_mixed_load(isolated: Stack) -> None:
    good = [encode(scene(48 + i, 36, seed=i)) for i in range(8)]
    larger = [encode(scene(300, 200, seed=i)) for i in range(8)]
    truncated = [whole[: len(whole) * 2 // 3] for whole in larger]  # the header survives, the pixels do not
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")
    # (name, body and query for the i-th job, expected submission status, expected code)
    kinds: list[Kind] = (
        [("good", lambda i: (good[i % 8], ""), 202, None)] * 2
        + [("not an image", lambda i: (b"%PDF-1.4 " + bytes([i % 256]) * 64, ""), 415, "not_an_image")] * 2
        + [("truncated", lambda i: (truncated[i % 8], ""), 202, "invalid_image")] * 2
        + [("bomb", lambda i: (bomb, ""), 422, "too_many_pixels")]
        + [("bad threshold", lambda i: (good[0], "?threshold=7"), 422, "invalid_parameter")]
    )
    random.Random(0).shuffle(kinds)
    counter = itertools.count()
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def one_client(_: int) -> list[tuple[str, int, str | None]]:
        outcomes = []
        with httpx.Client(base_url=isolated.url, timeout=120) as client:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter)
                name, make, _, _ = kinds[n % len(kinds)]
                body, query = make(n)
                response = client.post(
                    f"/v1/jobs{query}", content=body, headers={"Content-Type": "image/jpeg"}
                )
                if response.status_code != 202:
                    outcomes.append((name, response.status_code, response.json().get("code")))
                    continue
                job = response.json()
                while job["status"] in ("queued", "running"):
                    job = client.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=30"}).json()
                code = job["status"] if job["status"] == "succeeded" else job["error"]["code"]
                outcomes.append((name, 202, code))
        return outcomes

    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = [o for client_outcomes in pool.map(one_client, range(CLIENTS)) for o in client_outcomes]

    tally = Counter(outcomes)
    expected = {name: (status, code or "succeeded") for name, _, status, code in kinds}
    assert not [o for o in outcomes if o[1] >= 500], tally
    for name, status, code in outcomes:
        assert (status, code) == expected[name], (name, status, code, tally)
    succeeded = tally[("good", 202, "succeeded")]
    assert succeeded >= 10 and len(tally) == len(expected), tally  # every kind was sent, good ones ran

    with isolated.redis.client(db=int(isolated.env["SEGSERVE_REDIS_URL"].rsplit("/", 1)[1])) as redis:
        queue = redis.zcard("arq:queue")
        used = int(redis.info("memory")["used_memory"])
    blobs = Path(isolated.env["SEGSERVE_BLOB_URL"])
    inputs, masks = (len(list((blobs / kind).glob("j_*"))) for kind in ("inputs", "masks"))
    failed = sum(n for (_, status, code), n in tally.items() if status == 202 and code != "succeeded")
    assert inputs == failed, "a failed job keeps its input for a retry; a succeeded one needs it no more"
    assert masks == succeeded
    assert queue == 0
    assert used < 64 << 20, f"Redis holds {used / 2**20:.0f} MB after the load"
