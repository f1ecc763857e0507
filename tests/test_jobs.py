"""The job protocol (gateway.jobs) against a real Redis and a blob directory: each Lua script, the records,
the blobs' lifecycle, the queue's bounds, and the races the scripts exist for. arq's own part (its in-progress
key while a worker runs a try, and the removal of its records when the try ends) is done here by hand, as arq
does it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.exceptions import OutOfMemoryError

from gateway.jobs import (
    Job,
    JobError,
    JobStatus,
    JobStore,
    Outcome,
    QueueFull,
    Result,
    RetryRefused,
    StaleTry,
    keys,
    now_ms,
)
from gateway.jobs.connection import stop, worker_connection
from gateway.jobs.scripts import STEPS
from gateway.jobs.waiting import Waiters
from gateway.settings import Settings
from gateway.worker.sweeper import Sweeper
from tests.harness.images import encode, scene
from tests.harness.jobs import submit as submit_image
from tests.harness.processes import BIN, ROOT, eventually, free_port, spawn, stop_process, wait_until
from tests.harness.servers import RedisServer

IMAGE = encode(scene(32, 24))
RESULT = Result(32, 24, [{"id": 0, "name": "__background__", "pixels": 768, "fraction": 1.0}])


async def submit(store: JobStore, owner: str = "", key: str | None = None, image: bytes = IMAGE) -> Job:
    return await submit_image(store, image, owner, key)


async def take(store: JobStore, job: Job) -> Job:
    """What arq and the worker do when a try begins: arq's in-progress key, then the store's start."""
    await store.redis.set(in_progress_key_prefix + job.id, b"1", px=60_000)
    started = await store.start(job.id, deadline_ms=4e12)
    assert started is not None and await store.input(started) == IMAGE
    return started


async def end_try(store: JobStore, job_id: str) -> None:
    """What arq does when a try ends for good (finish_job with keep_result = 0)."""
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.delete(in_progress_key_prefix + job_id, job_key_prefix + job_id, f"arq:retry:{job_id}")
        pipe.zrem("arq:queue", job_id)
        await pipe.execute()


async def keys_of(store: JobStore, job_id: str) -> list[bytes]:
    """The job's keys in Redis, but for its entry in the blob expiries (a sorted set, not a key of its own)."""
    return sorted(await store.redis.keys(f"*{job_id}*"))


def blobs_of(store: JobStore, job_id: str) -> set[str]:
    """The job's blobs that exist, by prefix."""
    assert store.blobs.directory is not None
    return {name.split("/")[0] for name in keys.blobs_of(job_id) if (store.blobs.directory / name).exists()}


async def test_submit_then_load_shows_queue_positions(store: JobStore) -> None:
    jobs = [await submit(store) for _ in range(3)]
    assert [j.position for j in jobs] == [0, 1, 2]
    loaded = await store.load(jobs[2].id)
    assert loaded is not None and loaded.status is JobStatus.QUEUED and loaded.position == 2
    await take(store, jobs[0])  # running jobs are not ahead of anyone
    loaded = await store.load(jobs[2].id)
    assert loaded is not None and loaded.position == 1
    assert (await store.load(jobs[0].id)).status is JobStatus.RUNNING  # type: ignore[union-attr]


async def test_jobs_with_one_score_still_have_distinct_positions(store: JobStore) -> None:
    """Two gateways can enqueue in the same instant: arq then orders by id, and positions follow it."""
    first, second = await submit(store), await submit(store)
    await store.redis.zadd("arq:queue", {first.id: 1000, second.id: 1000})
    positions = {(await store.load(j.id)).position for j in (first, second)}  # type: ignore[union-attr]
    assert positions == {0, 1}


async def test_another_owners_job_is_unknown(store: JobStore) -> None:
    job = await submit(store, owner="alice")
    assert await store.load(job.id, "bob") is None
    assert await store.load(job.id, "alice") is not None
    assert await store.load("j_" + "0" * 32) is None
    assert await store.load("not-an-id") is None


async def test_idempotency_is_decided_inside_the_submit(store: JobStore) -> None:
    jobs = await asyncio.gather(*(submit(store, key="order-17") for _ in range(50)))
    assert len({j.id for j in jobs}) == 1
    assert await store.redis.zcard("arq:queue") == 1
    assert len(await store.redis.keys("segserve:job:*")) == 1
    assert blobs_of(store, jobs[0].id) == {"inputs"}
    assert len(list((store.blobs.directory / "inputs").iterdir())) == 1, "the repeats' inputs are gone"  # type: ignore[operator]
    other = await submit(store, owner="someone else", key="order-17")  # keys are per API key
    assert other.id != jobs[0].id


async def test_queue_bound(store: JobStore) -> None:
    store.config = dataclasses.replace(store.config, max_queued=2)
    await submit(store)
    await submit(store)
    with pytest.raises(QueueFull) as refused:
        await submit(store)
    assert refused.value.limit == "queue"
    assert len(list((store.blobs.directory / "inputs").iterdir())) == 2, "the refused input is gone"  # type: ignore[operator]


async def test_the_byte_budget_counts_inputs_until_their_jobs_end(store: JobStore) -> None:
    store.config = dataclasses.replace(store.config, max_queued_bytes=2 * len(IMAGE))
    first, second = await submit(store), await submit(store)
    assert await store.pending_bytes() == 2 * len(IMAGE)
    with pytest.raises(QueueFull) as refused:
        await submit(store)
    assert refused.value.limit == "bytes"
    # Running still counts: the input is held until the job ends.
    running = await take(store, first)
    with pytest.raises(QueueFull):
        await submit(store)
    await store.complete(running, Outcome.succeeded(RESULT, b"PNG", {}))
    assert await store.pending_bytes() == len(IMAGE)
    third = await submit(store)  # room again
    for job in (second, third):
        assert await store.cancel(job.id) is JobStatus.CANCELED
    assert await store.pending_bytes() == 0
    # A retry counts as a new job does.
    store.config = dataclasses.replace(store.config, max_queued_bytes=len(IMAGE))
    assert await store.retry(second.id) is None
    with pytest.raises(QueueFull) as refused_retry:
        await store.retry(third.id)
    assert refused_retry.value.limit == "bytes"


async def test_a_lone_job_is_let_in_however_large(store: JobStore) -> None:
    store.config = dataclasses.replace(store.config, max_queued_bytes=10)
    job = await submit(
        store
    )  # larger than the budget, but nothing else waits: refusing it would stall it forever
    assert job.input_bytes == len(IMAGE) > 10
    with pytest.raises(QueueFull):
        await submit(store)


async def test_near_its_memory_limit_redis_takes_no_new_jobs_but_ends_every_accepted_one(
    store: JobStore,
) -> None:
    """Admission stops at 90% of maxmemory, so that arq (whose own writes Redis refuses when full) can still
    take accepted jobs; past the limit itself, the steps of accepted jobs still run, new work is refused whole."""
    first, second = await submit(store), await submit(store)
    running = await take(store, first)
    await store.redis.set(
        in_progress_key_prefix + second.id, b"1", px=60_000
    )  # arq takes it before the limit
    used = int((await store.redis.info("memory"))["used_memory"])
    try:
        await store.redis.config_set("maxmemory", int(used / 0.95))  # over the share admission stops at
        with pytest.raises(QueueFull) as refused:
            await submit(store)
        assert refused.value.limit == "memory"
        await store.redis.config_set("maxmemory", used // 2)  # and over the limit itself
        with pytest.raises(OutOfMemoryError):
            await submit(store)  # Redis refuses the whole step: nothing of it is written
        assert len(await store.redis.keys("segserve:job:*")) == 2
        assert await store.complete(running, Outcome.succeeded(RESULT, b"PNG", {})) is JobStatus.SUCCEEDED
        started = await store.start(second.id, deadline_ms=4e12)
        assert started is not None
        assert await store.complete(started, Outcome.failed("invalid_image", "x")) is JobStatus.FAILED
        await store.redis.delete(in_progress_key_prefix + second.id)  # arq ends the try: a DEL, allowed
        with pytest.raises(OutOfMemoryError):
            await store.retry(second.id)  # new work is refused whole
        await store.delete(second.id)
    finally:
        await store.redis.config_set("maxmemory", 0)
    done = await store.load(first.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and await store.load(second.id) is None


async def test_a_succeeded_job_keeps_its_result_and_mask_and_drops_its_input(store: JobStore) -> None:
    job = await take(store, await submit(store))
    status = await store.complete(job, Outcome.succeeded(RESULT, b"PNG", {"inference": 12.5}, b"OVERLAY"))
    await end_try(store, job.id)
    assert status is JobStatus.SUCCEEDED
    done = await store.load(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED and done.result == RESULT
    assert done.timings_ms["inference"] == 12.5 and "total" in done.timings_ms
    assert done.attempts == 1 and done.started_at is not None and done.finished_at is not None
    assert (done.mask, done.overlay) == (keys.mask_blob(job.id), keys.overlay_blob(job.id))
    assert await store.blobs.get(done.mask) == b"PNG" and await store.blobs.get(done.overlay) == b"OVERLAY"
    assert blobs_of(store, job.id) == {"masks", "overlays"}, "nothing can run it again: its input is gone"
    assert 59_000 < await store.redis.pttl(keys.job(job.id)) <= 60_000
    stats = await store.fleet.queue_stats()
    assert (stats.succeeded, stats.running, stats.queued) == (1, 0, 0)
    counters = await store.fleet.counters()
    assert counters.stats["finished:succeeded"] == 1 and counters.stats["total:sum"] > 0


async def test_a_failed_job_keeps_its_input_for_a_retry(store: JobStore) -> None:
    job = await take(store, await submit(store))
    assert await store.complete(job, Outcome.failed("invalid_image", "broken")) is JobStatus.FAILED
    done = await store.load(job.id)
    assert done is not None and done.error is not None and done.error.code == "invalid_image"
    assert blobs_of(store, job.id) == {"inputs"} and done.mask is None


async def test_redis_keeps_a_few_kb_per_job_whatever_the_image_size(store: JobStore) -> None:
    """Only metadata is in Redis: a job of a 2 MB image costs what a job of a 2 kB image costs."""
    small, large = IMAGE, os.urandom(2 << 20)

    async def cost(image: bytes) -> float:
        before = int((await store.redis.info("memory"))["used_memory"])
        for _ in range(20):
            await submit(store, image=image)
        return (int((await store.redis.info("memory"))["used_memory"]) - before) / 20

    await cost(small)  # the first jobs also make the shared sets and hashes they join
    per_small, per_large = await cost(small), await cost(large)
    assert per_large < 4096 and abs(per_large - per_small) < 1024, (per_small, per_large)


async def test_cancel_a_queued_job_and_it_never_starts(store: JobStore) -> None:
    job = await submit(store)
    assert await store.cancel(job.id) is JobStatus.CANCELED
    assert await store.cancel(job.id) is JobStatus.CANCELED  # again: the same answer
    assert await store.start(job.id, deadline_ms=4e12) is None
    assert await store.redis.zcard("arq:queue") == 0
    assert await keys_of(store, job.id) == [f"segserve:job:{job.id}".encode()]
    assert blobs_of(store, job.id) == {"inputs"}  # kept for a retry
    canceled = await store.load(job.id)
    assert canceled is not None and canceled.status is JobStatus.CANCELED and canceled.attempts == 0
    assert canceled.finished_at is not None and canceled.expires_at == canceled.finished_at + 60_000
    assert 59_000 < await store.redis.pttl(f"segserve:job:{job.id}") <= 60_000  # kept as expires_at says


async def test_a_cancel_before_completion_wins(store: JobStore) -> None:
    job = await take(store, await submit(store))
    assert await store.cancel(job.id) is JobStatus.CANCELED
    assert await store.complete(job, Outcome.succeeded(RESULT, b"PNG", {}, b"OVERLAY")) is JobStatus.CANCELED
    assert blobs_of(store, job.id) == {"inputs"}, "the outcome's blobs go; the input stays, for a retry"
    stats = await store.fleet.queue_stats()
    assert stats.canceled == 1 and stats.succeeded == 0
    assert await store.pending_bytes() == 0


async def test_cancel_after_the_end_is_refused(store: JobStore) -> None:
    job = await take(store, await submit(store))
    await store.complete(job, Outcome.succeeded(RESULT, b"PNG", {}))
    assert await store.cancel(job.id) is JobStatus.SUCCEEDED
    assert await store.cancel("j_" + "0" * 32) is None


@pytest.mark.parametrize(
    "delete_first", [True, False], ids=["delete, then complete", "complete, then delete"]
)
async def test_delete_while_the_job_completes_leaves_nothing(store: JobStore, delete_first: bool) -> None:
    job = await take(store, await submit(store))
    steps = [store.delete(job.id), store.complete(job, Outcome.succeeded(RESULT, b"PNG", {}, b"OVERLAY"))]
    for step in steps if delete_first else reversed(steps):
        await step
    await end_try(store, job.id)
    assert await keys_of(store, job.id) == []
    assert blobs_of(store, job.id) == set()
    assert await store.load(job.id) is None and await store.pending_bytes() == 0


async def test_deletes_racing_completions_leave_nothing(store: JobStore) -> None:
    jobs = [await take(store, await submit(store)) for _ in range(30)]
    await asyncio.gather(
        *(store.complete(j, Outcome.succeeded(RESULT, b"PNG", {})) for j in jobs),
        *(store.delete(j.id) for j in jobs),
    )
    for job in jobs:
        await end_try(store, job.id)
    assert await store.redis.keys("segserve:job:*") == []
    assert all(blobs_of(store, job.id) == set() for job in jobs)
    assert await store.pending_bytes() == 0


async def test_delete_a_queued_job(store: JobStore) -> None:
    job = await submit(store)
    await store.redis.set(f"arq:retry:{job.id}", 1)  # arq's count of a try that asked to run later
    await store.delete(job.id)
    assert await keys_of(store, job.id) == [] and await store.redis.zcard("arq:queue") == 0
    assert blobs_of(store, job.id) == set() and await store.pending_bytes() == 0


async def test_the_sweeper_removes_the_blobs_of_jobs_that_expired(store: JobStore) -> None:
    waiting, done, kept = await submit(store), await take(store, await submit(store)), await submit(store)
    await store.complete(done, Outcome.succeeded(RESULT, b"PNG", {}))
    for job in (waiting, done):
        await store.redis.pexpire(keys.job(job.id), 1)  # their TTL runs out
    await asyncio.sleep(0.05)
    assert await store.sweep_expired() == 0, "not due yet: each is looked at when its job would expire"
    await store.redis.zadd(keys.BLOB_EXPIRY, {waiting.id: 0, done.id: 0, kept.id: 0})
    assert await store.sweep_expired() == 2
    assert blobs_of(store, waiting.id) == blobs_of(store, done.id) == set()
    assert blobs_of(store, kept.id) == {"inputs"}
    assert 59_000 < (await store.redis.zscore(keys.BLOB_EXPIRY, kept.id) or 0) - now_ms() <= 61_000
    assert await store.pending_bytes() == len(IMAGE), "the expired queued job no longer counts"
    assert await store.redis.zscore(keys.BLOB_EXPIRY, waiting.id) is None


async def test_the_sweeper_removes_blobs_that_no_job_owns(store: JobStore) -> None:
    owned = await submit(store)
    for name in ("inputs/j_" + "1" * 32, "masks/j_" + "2" * 32 + ".png", "masks/j_" + "3" * 32 + ".png"):
        await store.blobs.put(name, b"left by a crash")
    directory = store.blobs.directory
    assert directory is not None
    old = now_ms() / 1000 - 3600
    for path in [
        directory / "inputs" / f"j_{'1' * 32}",
        directory / "masks" / f"j_{'2' * 32}.png",
        directory / "inputs" / owned.id,
    ]:
        os.utime(path, (old, old))
    assert await Sweeper(store, Settings()).sweep_orphans(grace_s=600) == 2
    assert sorted(str(p.relative_to(directory)) for p in directory.rglob("j_*")) == [
        f"inputs/{owned.id}",  # its job exists
        f"masks/j_{'3' * 32}.png",  # too new: its job may be on its way into Redis
    ]


async def test_retry_queues_a_failed_job_again_and_keeps_its_attempts(store: JobStore) -> None:
    job = await take(store, await submit(store))
    await store.complete(job, Outcome.failed("backend_unavailable", "down"))
    assert await store.retry(job.id) == RetryRefused("ending")  # arq has not ended the try yet
    await end_try(store, job.id)
    assert await store.retry(job.id) is None
    again = await store.load(job.id)
    assert again is not None and again.status is JobStatus.QUEUED and again.position == 0
    assert again.attempts == 1 and again.error is None and again.finished_at is None
    assert await store.redis.exists(f"arq:job:{job.id}") and await store.redis.zcard("arq:queue") == 1
    assert await store.pending_bytes() == len(IMAGE)
    second = await take(store, again)
    assert second.attempts == 2
    await store.complete(second, Outcome.succeeded(RESULT, b"PNG", {}))
    assert (await store.load(job.id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]
    assert await store.retry(job.id) == RetryRefused("succeeded")


async def test_retry_refuses_what_it_cannot_run(store: JobStore) -> None:
    queued = await submit(store)
    assert await store.retry(queued.id) == RetryRefused("active")
    assert await store.retry("j_" + "0" * 32) == RetryRefused("missing")
    lost = await take(store, await submit(store))
    await store.blobs.delete([keys.input_blob(lost.id)])  # gone from the blob store (a lifecycle rule, say)
    assert await store.input(lost) is None
    assert await store.complete(lost, Outcome.input_missing()) is JobStatus.FAILED
    await end_try(store, lost.id)
    assert (await store.load(lost.id)).error.code == "input_missing"  # type: ignore[union-attr]
    assert await store.retry(lost.id) == RetryRefused("no_input")
    canceled = await submit(store)
    await store.cancel(canceled.id)
    assert await store.retry(canceled.id) is None
    assert (await store.load(canceled.id)).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def test_a_retried_try_starts_again_and_counts_attempts(store: JobStore) -> None:
    job = await take(store, await submit(store))
    await store.release(job)  # the try ended without an outcome (raise Retry)
    await store.redis.delete(in_progress_key_prefix + job.id)
    assert (await store.fleet.queue_stats()).running == 0
    again = await take(store, job)
    assert again.attempts == 2


async def test_a_job_arq_ends_without_an_outcome_fails_with_a_code(store: JobStore) -> None:
    gave_up = JobError("worker_error", "gave up")
    job = await take(store, await submit(store))
    assert not await store.abandon(job.id, gave_up)  # still arq's: running
    await end_try(store, job.id)  # arq's time limit: it ends the try, and keeps nothing
    assert await store.abandon(job.id, gave_up)
    failed = await store.load(job.id)
    assert failed is not None and failed.status is JobStatus.FAILED and failed.error == gave_up
    assert failed.finished_at is not None and blobs_of(store, job.id) == {"inputs"}  # kept for a retry
    assert (await store.fleet.queue_stats()).failed == 1 and await store.redis.zcard("segserve:running") == 0
    assert await store.pending_bytes() == 0
    assert await store.cancel(job.id) is JobStatus.FAILED  # ended: a cancel is refused
    assert not await store.abandon(job.id, gave_up)  # once


async def test_abandon_leaves_what_is_not_lost(store: JobStore) -> None:
    gave_up = JobError("worker_error", "gave up")
    done = await take(store, await submit(store))
    await store.complete(done, Outcome.succeeded(RESULT, b"PNG", {}))
    await end_try(store, done.id)
    retried = await take(store, await submit(store))
    assert await store.release(retried)  # the try asks to run later: arq puts it back in its queue
    await store.redis.delete(in_progress_key_prefix + retried.id)
    for job in (done, retried):
        assert not await store.abandon(job.id, gave_up)
    assert not await store.abandon("j_" + "0" * 32, gave_up)
    assert (await store.load(retried.id)).status is JobStatus.QUEUED  # type: ignore[union-attr]


async def test_a_canceled_try_asks_for_no_next_one(store: JobStore) -> None:
    job = await take(store, await submit(store))
    await store.cancel(job.id)
    assert not await store.release(job)
    assert await store.redis.zcard("segserve:running") == 0


async def test_a_lost_job_cannot_be_canceled(store: JobStore) -> None:
    lost = await submit(store)
    await end_try(store, lost.id)  # arq dropped it, and nobody said why
    assert await store.cancel(lost.id) is JobStatus.FAILED


async def test_start_forgets_tries_that_ended_without_a_word(store: JobStore) -> None:
    await store.redis.zadd("segserve:running", {"j_killed": 1000.0})  # a try whose worker was killed
    await take(store, await submit(store))
    assert await store.redis.zrange("segserve:running", 0, -1) != [b"j_killed"]
    assert await store.redis.zscore("segserve:running", "j_killed") is None


async def test_lost_jobs_fail_with_a_code(store: JobStore) -> None:
    lost = await submit(store)
    await end_try(store, lost.id)  # arq dropped it (expired in the queue, or too many tries)
    shown = await store.load(lost.id)
    assert shown is not None and shown.status is JobStatus.FAILED and shown.error is not None
    assert shown.error.code == "expired"


async def test_the_api_object_never_shows_the_owner_nor_where_blobs_are(store: JobStore) -> None:
    job = await take(store, await submit(store, owner="secret-owner"))
    await store.complete(job, Outcome.succeeded(RESULT, b"PNG", {"inference": 1.0}))
    shown = (await store.load(job.id, "secret-owner")).to_api()  # type: ignore[union-attr]
    assert "secret-owner" not in json.dumps(shown) and "owner" not in shown
    assert "masks/" not in json.dumps(shown)
    assert (
        shown["result"]["mask_url"] == f"/v1/jobs/{job.id}/mask.png" and "overlay_url" not in shown["result"]
    )
    assert shown["status"] == "succeeded" and "position" not in shown and "error" not in shown
    assert shown["timings_ms"]["queued"] >= 0 and shown["expires_at"] > shown["finished_at"]


async def test_a_loop_on_the_workers_client_stops_even_when_redis_py_swallows_the_cancel(
    fresh_redis: RedisServer,
) -> None:
    """With socket timeouts (the worker's client), redis-py can swallow a cancellation that lands inside a
    command (redis/redis-py#2551); a loop cancelled once then runs on, and the worker's shutdown hangs on it.
    One cancel per loop hung in about 1 of 20 tries here: 200 tries all end with ``stop``."""
    redis = worker_connection(Settings.from_env({"SEGSERVE_REDIS_URL": fresh_redis.url}))
    command = redis.register_script("return redis.call('TIME')")

    async def loop() -> None:
        while True:
            await command()
            await asyncio.sleep(0.001)

    try:
        for _ in range(200):
            task = asyncio.create_task(loop())
            await asyncio.sleep(random.uniform(0, 0.005))
            await asyncio.wait_for(stop(task), 5)
    finally:
        await redis.aclose(close_connection_pool=True)


def test_two_gateways_and_one_idempotency_key_make_one_job(fresh_redis: RedisServer, tmp_path: Path) -> None:
    env = {
        "SEGSERVE_REDIS_URL": fresh_redis.url,
        "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": f"http://127.0.0.1:{free_port()}",
    }
    ports = [free_port(), free_port()]
    gateways = [
        spawn(
            [str(BIN / "uvicorn"), "gateway.app:app", "--port", str(p), "--log-level", "warning"],
            tmp_path / f"gateway-{p}.log",
            cwd=ROOT,
            env={**os.environ, **env},
        )
        for p in ports
    ]
    try:
        for p in ports:
            wait_until(
                lambda p=p: httpx.get(f"http://127.0.0.1:{p}/healthz").status_code == 200, 30, "a gateway"
            )

        def post(n: int) -> httpx.Response:
            return httpx.post(
                f"http://127.0.0.1:{ports[n % 2]}/v1/jobs",
                content=IMAGE,
                timeout=30,
                headers={"Content-Type": "image/jpeg", "Idempotency-Key": "one-order"},
            )

        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(post, range(50)))
    finally:
        for gateway in gateways:
            stop_process(gateway)
    assert sorted({a.status_code for a in answers}) in ([200, 202], [202]), [a.text for a in answers]
    assert [a.status_code for a in answers].count(202) == 1
    assert len({a.json()["id"] for a in answers}) == 1
    with fresh_redis.client() as redis:
        assert len(redis.keys("segserve:job:*")) == 1 and redis.zcard("arq:queue") == 1


def test_every_step_ships_as_a_lua_script() -> None:
    from importlib.resources import files

    shipped = {p.name for p in files("gateway.jobs").joinpath("lua").iterdir()}
    assert shipped == {f"{step}.lua" for step in STEPS} | {"shared.lua"}  # the steps, and what they share


def test_the_scripts_name_no_key_and_say_what_they_may_do_when_redis_is_full() -> None:
    """Every key reaches a script as an argument (keys.py spells them all), and every step's first line tells
    Redis whether it may run out of memory: admission may not, the steps of accepted jobs may."""
    lua = files("gateway.jobs").joinpath("lua")
    for step in [*STEPS, "shared"]:
        text = lua.joinpath(f"{step}.lua").read_text()
        assert "segserve:" not in text and "arq:" not in text, step
    flags = {step: lua.joinpath(f"{step}.lua").read_text().splitlines()[0] for step in STEPS}
    assert {step for step, line in flags.items() if line == "#!lua"} == {"submit", "retry"}
    assert flags["load"] == "#!lua flags=no-writes"


def test_only_the_job_store_writes_job_keys() -> None:
    """Nothing but gateway/jobs/keys.py names a key: one owner of the protocol's names."""
    hits = subprocess.run(
        ["grep", "-rlE", "segserve:[a-z]|arq:(queue|in-progress)", "gateway"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert hits == ["gateway/jobs/keys.py"], hits


async def test_a_try_stalled_past_its_lease_can_neither_complete_nor_disturb_the_newer_one(
    store: JobStore,
) -> None:
    stalled = await take(store, await submit(store))
    await store.redis.delete(in_progress_key_prefix + stalled.id)  # its lease ran out: arq runs it again
    newer = await take(store, stalled)
    assert (stalled.attempts, newer.attempts) == (1, 2)
    with pytest.raises(StaleTry):
        await store.complete(stalled, Outcome.succeeded(RESULT, b"PNG", {}))
    with pytest.raises(StaleTry):
        await store.release(stalled)
    running = await store.load(newer.id)
    assert running is not None and running.status is JobStatus.RUNNING and running.attempts == 2
    assert await store.redis.zscore("segserve:running", newer.id) is not None  # the newer try's lease
    assert await store.redis.exists(in_progress_key_prefix + newer.id)
    assert blobs_of(store, newer.id) == {"inputs"}  # nothing of the stalled try's outcome was kept
    assert await store.complete(newer, Outcome.succeeded(RESULT, b"PNG", {})) is JobStatus.SUCCEEDED
    with pytest.raises(StaleTry):  # and never after the newer try has ended either
        await store.complete(stalled, Outcome.failed("internal_error", "late"))
    assert (await store.load(newer.id)).status is JobStatus.SUCCEEDED  # type: ignore[union-attr]


async def test_a_request_waiting_for_the_end_reads_the_job_at_its_start_and_at_its_end_only(
    store: JobStore, fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's start wakes its event streams (it changed) but not the requests that wait for its end
    (`Prefer: wait`): they read it when they begin and when it ends, one read a job fewer."""
    reads: list[str] = []
    load = store.load

    async def read(job_id: str, owner: str = "") -> Job | None:
        job = await load(job_id, owner)
        reads.append(job.status.value if job else "gone")
        return job

    monkeypatch.setattr(store, "load", read)
    waiters = Waiters(ArqRedis.from_url(fresh_redis.url))
    await waiters.start()
    try:
        job = await submit(store)
        streamed: list[str] = []

        async def stream() -> None:
            async for seen in waiters.changes(store, job.id, ""):
                streamed.append(seen.status.value if seen else "gone")

        waiting = asyncio.create_task(waiters.wait_for_end(store, job.id, "", timeout=60))
        following = asyncio.create_task(stream())
        await eventually(lambda: reads.count("queued") == 2, "both to read the job once")
        running = await take(store, job)
        await eventually(lambda: streamed == ["queued", "running"], "the stream to see the start")
        await asyncio.sleep(0.3)  # time for the request waiting for the end to read it, were it woken
        assert await store.complete(running, Outcome.succeeded(RESULT, b"PNG", {})) is JobStatus.SUCCEEDED
        ended = await asyncio.wait_for(waiting, 30)
        assert ended is not None and ended.status is JobStatus.SUCCEEDED
        await asyncio.wait_for(following, 30)
        assert streamed == ["queued", "running", "succeeded"]
        assert sorted(reads) == sorted(["queued", "queued", "running", "succeeded", "succeeded"])
    finally:
        await waiters.stop()
