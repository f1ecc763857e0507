"""Fair sharing between API keys, on the job store and a real Redis: the dispatch's weighted order, a key's
limits, priorities within a key, positions that come true, deadlines, a key's own job list, and what one
dispatch costs. A worker's part is played here by hand, as tests/test_jobs.py plays it: take the head of
arq's queue, start, complete, end arq's try."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix

from gateway.jobs import Job, JobStatus, JobStore, Outcome, OwnerLimits, Priority, QueueFull, Result, keys
from gateway.jobs.fairness import VIEW_SECONDS
from gateway.settings import Settings
from gateway.tenants import KeysError, load
from tests.harness.images import encode, scene
from tests.harness.jobs import directory_store, submit
from tests.harness.processes import BIN, LOOPBACK_CLIENT, wait_until
from tests.harness.servers import RedisServer, Stack, isolated_env

IMAGE = encode(scene(32, 24))
RESULT = Result(32, 24, [{"id": 0, "name": "__background__", "pixels": 768, "fraction": 1.0}])
SLOTS = 2  # the live workers' slots, as their heartbeats would say: arq's queue is kept at twice this


@pytest.fixture
async def store(fresh_redis: RedisServer, tmp_path: Path) -> AsyncIterator[JobStore]:
    job_store = directory_store(
        fresh_redis.url, tmp_path / "blobs", result_ttl_s=600, max_queued=5000, min_window=1
    )
    await job_store.redis.hset(keys.STATS, keys.FLEET_SLOTS, str(SLOTS))  # type: ignore[misc]
    yield job_store
    await job_store.redis.aclose()


async def run_next(store: JobStore) -> Job | None:
    """A worker's one try: the first job in arq's queue that no try runs, started and completed."""
    for raw in await store.redis.zrange(keys.QUEUE, 0, -1):
        job_id = raw.decode()
        if not await store.redis.exists(in_progress_key_prefix + job_id):
            await store.redis.set(in_progress_key_prefix + job_id, b"1", px=60_000)
            started = await store.start(job_id, deadline_ms=4e12)
            assert started is not None
            await store.complete(started, Outcome.succeeded(RESULT, b"png", {}))
            await store.redis.delete(in_progress_key_prefix + job_id, job_key_prefix + job_id)
            return started
    return None


async def run_all(store: JobStore) -> list[Job]:
    started = []
    while (job := await run_next(store)) is not None:
        started.append(job)
    return started


async def test_started_jobs_split_by_weight_under_a_flood_from_both(store: JobStore) -> None:
    heavy, light = OwnerLimits(weight=3), OwnerLimits(weight=1)
    for _ in range(150):
        await submit(store, IMAGE, "heavy", limits=heavy)
        await submit(store, IMAGE, "light", limits=light)
    started = [job.owner for job in await run_all(store)][2 * SLOTS : 2 * SLOTS + 160]
    ratio = started.count("heavy") / started.count("light")
    assert 2.7 <= ratio <= 3.3, ratio
    assert all(job.status is JobStatus.SUCCEEDED for job in await listed(store, "heavy", "light"))


async def listed(store: JobStore, *owners: str) -> list[Job]:
    jobs: list[Job] = []
    for owner in owners:
        before = None
        while True:
            page, before = await store.list_jobs(owner, None, before, 200)
            jobs += page
            if before is None:
                break
    return jobs


async def test_a_key_that_arrives_behind_a_flood_starts_within_one_window(store: JobStore) -> None:
    flood = [await submit(store, IMAGE, "a") for _ in range(200)]
    late = [await submit(store, IMAGE, "b") for _ in range(6)]
    # Its positions say so at once: behind arq's short queue, taking turns with a's jobs.
    assert [job.position for job in late] == [2 * SLOTS + 2 * i for i in range(6)]
    order = [job.id for job in await run_all(store)]
    assert max(order.index(job.id) for job in late) <= 2 * SLOTS + 2 * len(late)
    assert sorted(order) == sorted(job.id for job in flood + late)  # each ran once


async def test_positions_come_true_under_fair_dispatch(store: JobStore) -> None:
    jobs = [await submit(store, IMAGE, owner) for owner in ["a"] * 20 + ["b"] * 5 + ["c"] * 8]
    await asyncio.sleep(VIEW_SECONDS)  # a gateway's reading of the fair order is at most this old
    loaded = [await store.load(job.id, job.owner) for job in jobs]
    predicted = {job.id: job.position for job in loaded if job is not None}
    order = [job.id for job in await run_all(store)]
    misses = [
        (order.index(job_id), position)
        for job_id, position in predicted.items()
        if abs(order.index(job_id) - position) > 1
    ]
    assert not misses, misses


async def test_priority_orders_a_keys_own_jobs_but_never_its_share(store: JobStore) -> None:
    for _ in range(2 * SLOTS):  # fill arq's queue, so the rest wait in their owners' queues
        await submit(store, IMAGE, "filler")
    low = await submit(store, IMAGE, "a", priority=Priority.LOW)
    normal = await submit(store, IMAGE, "a")
    high = await submit(store, IMAGE, "a", priority=Priority.HIGH)
    other = [await submit(store, IMAGE, "b") for _ in range(3)]
    order = [job.id for job in await run_all(store)][2 * SLOTS :]
    mine = [job_id for job_id in order if job_id in (low.id, normal.id, high.id)]
    assert mine == [high.id, normal.id, low.id]
    assert order[:2] in ([high.id, other[0].id], [other[0].id, high.id])  # still one turn each


async def test_a_keys_running_limit_holds_and_others_use_the_rest(store: JobStore) -> None:
    capped = OwnerLimits(max_running=1)
    for _ in range(5):
        await submit(store, IMAGE, "capped", limits=capped)
        await submit(store, IMAGE, "free")
    in_arq = [raw.decode() for raw in await store.redis.zrange(keys.QUEUE, 0, -1)]
    owners = [(await store.redis.hget(keys.job(job_id), "owner")).decode() for job_id in in_arq]  # type: ignore[misc]
    assert len(in_arq) == 2 * SLOTS and owners.count("capped") == 1
    assert len(await run_all(store)) == 10  # work-conserving: the capped key's jobs still all run


async def test_a_keys_queue_and_rate_limits_refuse_with_their_own_codes(store: JobStore) -> None:
    with pytest.raises(QueueFull) as refused:
        for _ in range(3):
            await submit(store, IMAGE, "a", limits=OwnerLimits(max_queued=2))
    assert refused.value.limit == "key_queue"
    rated = OwnerLimits(rate=0.5, burst=2)
    await submit(store, IMAGE, "b", limits=rated)
    await submit(store, IMAGE, "b", limits=rated)
    with pytest.raises(QueueFull) as limited:
        await submit(store, IMAGE, "b", limits=rated)
    assert limited.value.limit == "key_rate" and 1 <= limited.value.retry_after_s <= 2
    assert (await store.admission("c", rated)).tokens == 2  # another key's bucket is its own


async def test_a_job_not_started_by_its_deadline_expires(store: JobStore) -> None:
    for _ in range(2 * SLOTS):
        await submit(store, IMAGE, "filler")
    waiting = await submit(store, IMAGE, "a", queue_timeout_ms=200, webhook="http://example.test/hook")
    await asyncio.sleep(0.3)
    assert await store.tick() == (1, 0)
    expired = await store.load(waiting.id, "a")
    assert expired is not None and expired.status is JobStatus.EXPIRED
    assert expired.to_api()["error"]["code"] == "queue_timeout"
    assert expired.deliveries["job.completed"]["state"] == "pending"  # its webhook event is on its way
    assert await store.retry(waiting.id) is None  # and it may be queued again


async def test_a_keys_job_list_pages_newest_first_and_shows_no_other_key(store: JobStore) -> None:
    mine = [await submit(store, IMAGE, "a") for _ in range(7)]
    await submit(store, IMAGE, "b")
    pages, before = [], None
    while True:
        page, before = await store.list_jobs("a", None, before, 3)
        pages.append([job.id for job in page])
        if before is None:
            break
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [job_id for page in pages for job_id in page] == [job.id for job in reversed(mine)]
    assert await store.cancel_queued("a") == 7
    assert await store.list_jobs("a", JobStatus.QUEUED, None, 50) == ([], None)
    assert len((await store.list_jobs("b", JobStatus.QUEUED, None, 50))[0]) == 1


async def commands_of_one_completion(store: JobStore, owners: int, jobs_each: int) -> int:
    """Redis commands (the scripts' own calls included) that one completion and its dispatch run."""
    for index in range(owners * jobs_each):
        await submit(store, IMAGE, f"key-{index % owners}")
    job_id = (await store.redis.zrange(keys.QUEUE, 0, 0))[0].decode()
    started = await store.start(job_id, deadline_ms=4e12)
    assert started is not None
    await store.redis.config_resetstat()
    await store.complete(started, Outcome.succeeded(RESULT, b"png", {}))
    stats = await store.redis.info("commandstats")
    await store.redis.flushdb()
    await store.redis.hset(keys.STATS, keys.FLEET_SLOTS, str(SLOTS))  # type: ignore[misc]
    return sum(stat["calls"] for name, stat in stats.items() if name != "cmdstat_info")


async def test_the_dispatch_costs_the_same_however_many_jobs_wait(store: JobStore) -> None:
    few, many = (
        await commands_of_one_completion(store, 3, 10),
        await commands_of_one_completion(store, 3, 400),
    )
    assert few == many, (few, many)


def test_keys_are_parsed_strictly_and_fail_closed(tmp_path: Path) -> None:
    with pytest.raises(KeysError, match="names no key"):
        load(Settings(api_keys=","))
    listed = tmp_path / "keys"
    listed.write_text("live-key\n  #revoked-key\n\n")
    assert len(load(Settings(api_keys_file=str(listed))).by_digest) == 1
    listed.write_text("# nobody\n")
    with pytest.raises(KeysError, match="names no key"):
        load(Settings(api_keys_file=str(listed)))
    toml = tmp_path / "keys.toml"
    for text, error in (
        ('[[key]]\nname = "a"\nkey = "k1"\nwieght = 2\n', "unknown fields"),
        ('[[key]]\nname = "a"\nkey = "k1"\n[[key]]\nname = "a"\nkey = "k2"\n', "two keys are named"),
        ('[[key]]\nname = "a"\nkey = "k1"\nweight = 0\n', "weight must be"),
        ('[[key]]\nname = "a"\n', "exactly one of key or sha256"),
        ("[[key]\n", "keys.toml"),
    ):
        toml.write_text(text)
        with pytest.raises(KeysError, match=error):
            load(Settings(api_keys_file=str(toml)))


def test_a_keys_limits_default_to_half_of_the_queue_and_the_workers(tmp_path: Path) -> None:
    toml = tmp_path / "keys.toml"
    toml.write_text(
        '[defaults]\nrate = 5\n\n[[key]]\nname = "big"\nkey = "big-key"\nweight = 3\nmax_queued = 900\n\n'
        '[[key]]\nname = "small"\nsha256 = "' + "ab" * 32 + '"\n'
    )
    tenants = load(Settings(api_keys_file=str(toml), max_queued=1000))
    big, small = sorted(tenants.by_digest.values(), key=lambda tenant: tenant.name)
    assert tenants.limits(big) == OwnerLimits(weight=3, max_queued=900, running_share=0.5, rate=5, burst=5)
    assert tenants.limits(small) == OwnerLimits(max_queued=500, running_share=0.5, rate=5, burst=5)
    alone = load(Settings(api_keys="only-key"))
    assert alone.limits(next(iter(alone.by_digest.values()))) == OwnerLimits()  # one key has everything


# Over HTTP: the gateway in-process (as tests/test_app.py runs it), then a whole stack.


@pytest.fixture
def keyed(fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A keys file for two keys, a's limited; the gateway reads it again as soon as it changes."""
    monkeypatch.setenv("SEGSERVE_REDIS_URL", fresh_redis.url)
    monkeypatch.setenv("SEGSERVE_BLOB_URL", str(tmp_path / "blobs"))
    monkeypatch.setenv("SEGSERVE_KEYS_RELOAD_SECONDS", "0")
    monkeypatch.setenv("SEGSERVE_KEY_MAX_STREAMS", "1")
    toml = tmp_path / "keys.toml"
    toml.write_text(A_KEYS)
    monkeypatch.setenv("SEGSERVE_API_KEYS_FILE", str(toml))
    return toml


A_KEYS = '[[key]]\nname = "a"\nkey = "a-key"\nmax_queued = 3\nrate = 0.2\nburst = 2\n\n[[key]]\nname = "b"\nkey = "b-key"\n'
A = {"Authorization": "Bearer a-key", "Content-Type": "image/jpeg"}
B = {"Authorization": "Bearer b-key", "Content-Type": "image/jpeg"}


def test_each_limit_is_refused_with_its_code_and_ratelimit_fields(keyed: Path) -> None:
    from starlette.testclient import TestClient

    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        first = api.post("/v1/jobs", content=IMAGE, headers=A)
        assert first.status_code == 202
        assert first.headers["ratelimit-policy"] == '"rate";q=2;w=10, "queued";q=3'
        assert first.headers["ratelimit"] == '"rate";r=1;t=5, "queued";r=2'
        assert api.post("/v1/jobs", content=IMAGE, headers=A).status_code == 202
        limited = api.post("/v1/jobs", content=IMAGE, headers=A)
        assert limited.status_code == 429 and limited.json()["code"] == "key_rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 5 and '"rate";r=0' in limited.headers["ratelimit"]
        keyed.write_text(A_KEYS.replace("rate = 0.2", "rate = 100"))  # read again without a restart
        os.utime(keyed, (time.time() + 5, time.time() + 5))
        time.sleep(0.1)  # at 100 a second, the bucket refills at once
        assert api.post("/v1/jobs", content=IMAGE, headers=A).status_code == 202
        full = api.post("/v1/jobs", content=IMAGE, headers=A)
        assert full.status_code == 429 and full.json()["code"] == "key_queue_full"
        assert '"queued";r=0' in full.headers["ratelimit"] and full.headers["retry-after"]
        assert api.post("/v1/jobs", content=IMAGE, headers=B).status_code == 202  # b has its own limits

        listed = api.get("/v1/jobs?limit=2", headers=A).json()
        assert len(listed["jobs"]) == 2 and listed["next_cursor"]
        rest = api.get(f"/v1/jobs?limit=2&cursor={listed['next_cursor']}", headers=A).json()
        assert len(rest["jobs"]) == 1 and rest["next_cursor"] is None
        assert api.get("/v1/jobs?status=queued", headers=B).json()["jobs"][0]["priority"] == "normal"
        assert api.get("/v1/jobs?status=nope", headers=A).json()["code"] == "invalid_parameter"
        assert api.get("/v1/jobs?cursor=%%%", headers=A).json()["code"] == "invalid_parameter"
        assert api.post("/v1/jobs/cancel", headers=A).json() == {"canceled": 3}
        assert api.get("/v1/jobs?status=queued", headers=A).json()["jobs"] == []
        assert len(api.get("/v1/jobs?status=queued", headers=B).json()["jobs"]) == 1
        assert 'segserve_key_waiting{key="b"} 0.0' in api.get("/metrics").text
        assert 'segserve_key_dispatched{key="b"} 1.0' in api.get("/metrics").text


def test_priority_and_queue_timeout_are_checked(keyed: Path) -> None:
    from starlette.testclient import TestClient

    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        for query in ("priority=urgent", "queue_timeout=0", "queue_timeout=nan", "queue_timeout=99999999"):
            answer = api.post(f"/v1/jobs?{query}", content=IMAGE, headers=B)
            assert answer.status_code == 422 and answer.json()["code"] == "invalid_parameter", query
        job = api.post("/v1/jobs?priority=high&queue_timeout=30", content=IMAGE, headers=B).json()
        assert job["priority"] == "high" and job["queue_timeout"] == 30 and job["position"] == 0


def test_live_event_streams_are_capped_per_key(keyed: Path) -> None:
    from starlette.testclient import TestClient

    from gateway.app import app

    with TestClient(app, client=LOOPBACK_CLIENT) as api:
        job = api.post("/v1/jobs", content=IMAGE, headers=B).json()
        with api.stream("GET", f"/v1/jobs/{job['id']}/events", headers=B) as first:
            assert first.status_code == 200
            second = api.get(f"/v1/jobs/{job['id']}/events", headers=B)
            assert second.status_code == 429 and second.json()["code"] == "too_many_streams"


def test_a_flood_from_one_key_holds_up_no_other(stack: Stack) -> None:
    """Key a submits until its share of the queue is full; then b submits. Every one of b's is accepted, and
    starts within about one in-flight window, not after a's backlog; every job runs once and succeeds."""
    env = isolated_env(stack, SEGSERVE_API_KEYS="flood-key,late-key", SEGSERVE_MAX_QUEUED="120")
    own = Stack(stack.redis, stack.torchserve, env, log_dir=stack.log_dir)
    own.start_gateway()
    own.start_worker()
    flood_key, late_key = (
        {"Authorization": f"Bearer {k}", "Content-Type": "image/jpeg"} for k in ("flood-key", "late-key")
    )
    try:
        with httpx.Client(base_url=own.url, timeout=60) as client:
            queue = lambda: client.get("/v1/queue", headers=flood_key).json()["workers"]  # noqa: E731
            wait_until(queue, 30, "the worker's heartbeat")
            flood = []
            while (answer := client.post("/v1/jobs", content=IMAGE, headers=flood_key)).status_code == 202:
                flood.append(answer.json()["id"])
            assert answer.json()["code"] == "key_queue_full" and len(flood) >= 60  # half; more as jobs end
            late = [client.post("/v1/jobs", content=IMAGE, headers=late_key) for _ in range(6)]
            assert [answer.status_code for answer in late] == [202] * 6
            ended = {job_id: ended_job(client, job_id, flood_key) for job_id in flood}
            ended |= {
                answer.json()["id"]: ended_job(client, answer.json()["id"], late_key) for answer in late
            }
        listed = subprocess.run(
            [
                str(BIN / "segserve"),
                "jobs",
                "--url",
                own.url,
                "--api-key",
                "late-key",
                "--status",
                "succeeded",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "6 jobs" in listed.stdout and all(answer.json()["id"] in listed.stdout for answer in late)
    finally:
        own.stop()
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in ended.values())
    b_arrived = min(parse_time(ended[answer.json()["id"]]["created_at"]) for answer in late)
    b_waits = [parse_time(ended[a.json()["id"]]["started_at"]) - b_arrived for a in late]
    a_drain = max(parse_time(ended[job_id]["finished_at"]) for job_id in flood) - b_arrived
    assert max(b_waits) < 0.5 * a_drain, (b_waits, a_drain)


def ended_job(client: httpx.Client, job_id: str, headers: dict[str, str]) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(
            f"/v1/jobs/{job_id}", headers={**headers, "Prefer": "wait=30"}
        ).json()
        if job["status"] not in ("queued", "running"):
            return job


def parse_time(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
