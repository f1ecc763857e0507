"""Live job events (Server-Sent Events) from a real gateway process on a real Redis. The jobs are moved
through their states with the job store, as workers move them, so each change is one the test chose."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from arq.constants import in_progress_key_prefix

from gateway.jobs import Outcome, Result
from tests.harness.images import encode, scene
from tests.harness.jobs import directory_store
from tests.harness.processes import BIN, ROOT, free_port, spawn, stop_process, wait_until
from tests.harness.servers import RedisServer

IMAGE = encode(scene(32, 24))
RESULT = Result(32, 24, [{"id": 0, "name": "__background__", "pixels": 768, "fraction": 1.0}])


@pytest.fixture
def live_gateway(fresh_redis: RedisServer, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "SEGSERVE_REDIS_URL": fresh_redis.url,
        "SEGSERVE_BLOB_URL": str(tmp_path / "blobs"),
        "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
    }
    process = spawn(
        [str(BIN / "uvicorn"), "gateway.app:app", "--port", str(port), "--log-level", "warning"],
        tmp_path / "gateway.log",
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 30, "the gateway")
    yield url
    stop_process(process)


class Worker:
    """Moves jobs as a worker does: arq's in-progress key, then the store's start; complete; arq's end."""

    def __init__(self, redis_url: str, blobs: Path) -> None:
        self.redis_url = redis_url
        self.blobs = blobs

    def run(self, step: str, job_id: str) -> None:
        asyncio.run(self._run(step, job_id))

    async def _run(self, step: str, job_id: str) -> None:
        store = directory_store(self.redis_url, self.blobs, result_ttl_s=60)
        try:
            if step == "start":
                await store.redis.set(in_progress_key_prefix + job_id, b"1", px=60_000)
                assert await store.start(job_id, deadline_ms=4e12) is not None
            else:
                job = await store.load(job_id)
                assert job is not None
                await store.complete(job, Outcome.succeeded(RESULT, b"PNG", {}))
                async with store.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(in_progress_key_prefix + job_id, f"arq:job:{job_id}")
                    pipe.zrem("arq:queue", job_id)
                    await pipe.execute()
        finally:
            await store.redis.aclose()


def read_events(response: httpx.Response, seen: list[tuple[str, dict]]) -> None:  # type: ignore[type-arg]
    event_id, data = "", ""
    for line in response.iter_lines():
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            seen.append((event_id, json.loads(data)))
            event_id, data = "", ""


def submit(url: str) -> str:
    response = httpx.post(f"{url}/v1/jobs", content=IMAGE, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_a_job_behind_others_streams_each_change_then_closes(
    live_gateway: str, fresh_redis: RedisServer, tmp_path: Path
) -> None:
    first, second, mine = submit(live_gateway), submit(live_gateway), submit(live_gateway)
    worker = Worker(fresh_redis.url, tmp_path / "blobs")
    seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    with httpx.stream("GET", f"{live_gateway}/v1/jobs/{mine}/events", timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = threading.Thread(target=read_events, args=(response, seen))
        reader.start()
        for step, job_id, expected in [
            ("start", first, 2),
            ("start", second, 3),
            ("start", mine, 4),
            ("complete", mine, 5),
        ]:
            wait_until(lambda n=expected - 1: len(seen) >= n, 10, f"event {expected - 1}")
            worker.run(step, job_id)
        reader.join(timeout=30)
        assert not reader.is_alive(), "the stream did not close after the job ended"
    states = [(job["status"], job.get("position")) for _, job in seen]
    assert states == [("queued", 2), ("queued", 1), ("queued", 0), ("running", None), ("succeeded", None)]
    assert len({event_id for event_id, _ in seen}) == 5

    # A reconnect after the running event gets only what came after it; after the end, nothing.
    with httpx.stream(
        "GET", f"{live_gateway}/v1/jobs/{mine}/events", headers={"Last-Event-ID": seen[3][0]}
    ) as again:
        resumed: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        read_events(again, resumed)
    assert [job["status"] for _, job in resumed] == ["succeeded"]
    with httpx.stream(
        "GET", f"{live_gateway}/v1/jobs/{mine}/events", headers={"Last-Event-ID": seen[4][0]}
    ) as done:
        nothing: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        read_events(done, nothing)
    assert nothing == []


def test_events_of_an_unknown_or_deleted_job(live_gateway: str) -> None:
    assert httpx.get(f"{live_gateway}/v1/jobs/j_{'0' * 32}/events").status_code == 404
    job = submit(live_gateway)
    seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
    with httpx.stream("GET", f"{live_gateway}/v1/jobs/{job}/events", timeout=30) as response:
        reader = threading.Thread(target=read_events, args=(response, seen))
        reader.start()
        wait_until(lambda: seen, 10, "the first event")
        assert httpx.delete(f"{live_gateway}/v1/jobs/{job}").status_code == 204
        reader.join(timeout=30)
        assert not reader.is_alive(), "the stream did not close when the job was deleted"
    assert [j["status"] for _, j in seen] == ["queued"]


def test_retry_over_http(live_gateway: str, fresh_redis: RedisServer, tmp_path: Path) -> None:
    job = submit(live_gateway)
    refused = httpx.post(f"{live_gateway}/v1/jobs/{job}/retry")
    assert refused.status_code == 409 and refused.json()["code"] == "job_not_retryable"
    assert httpx.post(f"{live_gateway}/v1/jobs/{job}/cancel").json()["status"] == "canceled"
    retried = httpx.post(f"{live_gateway}/v1/jobs/{job}/retry")
    assert retried.status_code == 202 and retried.headers["location"] == f"/v1/jobs/{job}"
    assert retried.json()["status"] == "queued" and retried.json()["position"] == 0
    Worker(fresh_redis.url, tmp_path / "blobs").run("start", job)
    Worker(fresh_redis.url, tmp_path / "blobs").run("complete", job)
    done = httpx.get(f"{live_gateway}/v1/jobs/{job}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert httpx.post(f"{live_gateway}/v1/jobs/{job}/retry").status_code == 409
    assert httpx.post(f"{live_gateway}/v1/jobs/j_{'0' * 32}/retry").status_code == 404
