"""Redis with a replica and Sentinel, really started on loopback: an accepted job is on a replica before its
202, and a failover of the primary under load loses no accepted job."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.exceptions import ResponseError

from gateway.client import Client, SegserveError
from gateway.jobs import NotReplicated, keys
from gateway.jobs.connection import close, connect, deadlines, no_replicas
from gateway.settings import Settings
from tests.harness.images import encode, scene
from tests.harness.jobs import directory_store, submit
from tests.harness.processes import BIN, free_port, spawn, stop_process, wait_until
from tests.harness.redis_users import GATEWAY, KEDA, WORKER
from tests.harness.sentinel import MASTER, MIN_REPLICAS, ReplicatedRedis
from tests.harness.servers import RedisServer, Stack, TorchServeServer, stack_env

IMAGE = encode(scene(48, 36))


@pytest.fixture
def replicated(redis_binary: str, tmp_path: Path) -> Iterator[ReplicatedRedis]:
    servers = ReplicatedRedis.start(tmp_path)
    yield servers
    servers.stop()


async def test_an_accepted_job_is_on_a_replica(replicated: ReplicatedRedis, tmp_path: Path) -> None:
    store = directory_store(replicated.primary.url, tmp_path, min_replicas=2, replica_timeout_ms=500)
    redis = store.redis
    job = await submit(store, IMAGE)
    for server in replicated.replicas:
        with server.client() as replica:
            assert (
                replica.exists(f"segserve:job:{job.id}") and replica.zscore("arq:queue", job.id) is not None
            )
    replicated.replicas[0].stop()  # now only one replica can confirm a write, and two are asked for
    with pytest.raises(NotReplicated):
        await submit(store, IMAGE)
    assert await redis.zcard("arq:queue") == 1, "a job no replica confirmed is taken back"
    await redis.aclose()


@pytest.mark.slow
def test_a_failover_under_load_loses_no_accepted_job(
    replicated: ReplicatedRedis, torchserve: TorchServeServer, tmp_path: Path
) -> None:
    env = {
        **stack_env(replicated.primary, torchserve, tmp_path / "blobs"),
        "SEGSERVE_REDIS_SENTINELS": replicated.addresses,
        "SEGSERVE_REDIS_SENTINEL_MASTER": MASTER,
        "SEGSERVE_REDIS_MIN_REPLICAS": "1",
    }
    stack = Stack(replicated.primary, torchserve, env, log_dir=tmp_path)
    stack.start_gateway()
    stack.start_worker()
    accepted: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with Client(stack.url, retries=0) as client:
            while not stop.is_set():
                try:
                    accepted.append(client.submit(IMAGE)["id"])
                except SegserveError as exc:  # 503 while the failover runs: the client would try again
                    refused.append(exc.code)
                    time.sleep(0.1)

    try:
        wait_until(lambda: httpx.get(f"{stack.url}/readyz").json()["status"] == "ready", 120, "the stack")
        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(accepted) >= 20, 60, "jobs accepted before the failover")
        before = replicated.primary.port
        os.killpg(replicated.primary.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        wait_until(lambda: replicated.primary_port() != before, 60, "Sentinel to promote the replica")
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 20, 60, "jobs accepted after the failover")
        stop.set()
        for thread in threads:
            thread.join()
        with Client(stack.url) as client:
            ended = {job_id: client.wait(job_id, max_seconds=120)["status"] for job_id in accepted}
        assert set(ended.values()) == {"succeeded"}, {k: v for k, v in ended.items() if v != "succeeded"}
        print(f"{len(accepted)} accepted, {len(refused)} refused during the failover ({set(refused)})")
    finally:
        stop.set()
        stack.stop()


@pytest.fixture
def guarded(redis_binary: str, tmp_path: Path) -> Iterator[ReplicatedRedis]:
    servers = ReplicatedRedis.start(tmp_path, password="s3cret-for-tests")
    yield servers
    servers.stop()


async def test_guarded_sentinels_refuse_a_re_pointing_and_a_lone_primary_refuses_writes(
    guarded: ReplicatedRedis,
) -> None:
    import redis

    port = guarded.sentinel_ports[0]
    wait_until(lambda: guarded.primary_port() == guarded.primary.port, 30, "the sentinels")
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as stranger:
        for attempt in (
            ("SENTINEL", "MONITOR", "elsewhere", "127.0.0.1", "1", "1"),
            ("SENTINEL", "SET", MASTER, "auth-pass", "x"),
            ("SENTINEL", "REMOVE", MASTER),
            ("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER),
        ):
            with pytest.raises(redis.exceptions.AuthenticationError):
                stranger.execute_command(*attempt)
    # segserve's own users, with their passwords, may ask where the primary is, and nothing more.
    for user in (GATEWAY, WORKER, KEDA):
        with redis.Redis(port=port, username=user.name, password=user.password, socket_timeout=2) as ours:
            assert ours.sentinel_get_master_addr_by_name(MASTER) == (b"127.0.0.1", guarded.primary.port)
            for attempt in (
                ("SENTINEL", "MONITOR", "elsewhere", "127.0.0.1", "1", "1"),
                ("SENTINEL", "SET", MASTER, "down-after-milliseconds", "1"),
                ("SENTINEL", "REMOVE", MASTER),
                ("SENTINEL", "FAILOVER", MASTER),
                ("SENTINEL", "RESET", "*"),
                ("SENTINEL", "CONFIG", "SET", "resolve-hostnames", "no"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    ours.execute_command(*attempt)
    assert guarded.primary_port() == guarded.primary.port  # still the one it watched
    with guarded.primary.client() as primary:
        assert primary.config_get("min-replicas-to-write") == {"min-replicas-to-write": "1"}
    # The gateway's connection reaches the primary through them as the URL's user, and writes as that user.
    url = GATEWAY.login("redis://unused:1/0")
    settings = Settings(redis_url=url, redis_sentinels=guarded.addresses, redis_sentinel_master=MASTER)
    client = connect(settings, **deadlines(settings))
    assert await client.set("segserve:probe", "1")
    assert await client.acl_whoami() == GATEWAY.name
    await close(client)
    # Cut off from both replicas, the primary takes no write: what it would accept, a failover would drop.
    primary = connect(Settings(redis_url=guarded.primary.url), **deadlines(settings))
    for replica in guarded.replicas:
        replica.stop()
    with pytest.raises(ResponseError) as refused:
        for _ in range(100):  # until the primary sees them gone (at once: their connections close)
            await primary.set("segserve:probe", "2")
            await asyncio.sleep(0.1)
    assert no_replicas(refused.value)
    with pytest.raises(ResponseError) as in_a_pipeline:  # as arq's steps meet it: after the command's words
        async with primary.pipeline(transaction=True) as pipe:
            pipe.zincrby("arq:queue", 1, "j_probe")
            await pipe.execute()
    assert no_replicas(in_a_pipeline.value), in_a_pipeline.value
    await close(primary)


def test_the_worker_check_logs_in_to_guarded_sentinels(guarded: ReplicatedRedis) -> None:
    """The worker pods' liveness probe, as the worker's user: arq's own ``--check`` passes no login to the
    sentinels, so behind guarded ones it could never tell a live worker from a dead one."""
    from gateway.worker import WorkerSettings

    env = {
        **os.environ,
        "SEGSERVE_REDIS_URL": WORKER.login("redis://unused:1/0"),
        "SEGSERVE_REDIS_SENTINELS": guarded.addresses,
        "SEGSERVE_REDIS_SENTINEL_MASTER": MASTER,
    }
    check = [str(BIN / "segserve"), "worker", "--check"]
    wait_until(lambda: guarded.primary_port() == guarded.primary.port, 30, "the sentinels")
    silent = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert silent.returncode == 1 and "no heartbeat" in silent.stdout, silent.stdout + silent.stderr
    with guarded.primary.client() as primary:  # the heartbeat, as arq's worker writes it every 2 s
        primary.psetex(WorkerSettings.health_check_key, 10_000, "j_complete=0 j_failed=0")
    alive = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert alive.returncode == 0, alive.stdout + alive.stderr


@pytest.mark.slow
def test_a_worker_rides_out_a_primary_that_refuses_writes(redis_binary: str, tmp_path: Path) -> None:
    """A primary without a replica in sync (cut off, or just promoted while its replicas resync) refuses
    every write, arq's own too: its queue entry after a try that must come again. The worker goes on, and the
    job runs again once writes are taken; it used to end the worker, and with it every job it held."""
    with RedisServer(free_port(), tmp_path, options=MIN_REPLICAS) as server, server.client() as admin:
        admin.config_set("min-replicas-to-write", 0)

        async def queued() -> str:
            store = directory_store(server.url, tmp_path / "blobs")
            job = await submit(store, IMAGE)
            await store.redis.aclose()
            return job.id

        job_id = asyncio.run(queued())
        # A model server that takes the request and never answers: the try waits for its inference timeout.
        with socket.create_server(("127.0.0.1", 0)) as silent:
            model = f"http://127.0.0.1:{silent.getsockname()[1]}"
            env = {
                **os.environ,
                "SEGSERVE_REDIS_URL": server.url,
                "SEGSERVE_BLOB_URL": str(tmp_path / "blobs"),
                "SEGSERVE_TORCHSERVE_URL": model,
                "SEGSERVE_TORCHSERVE_MANAGEMENT_URL": model,
                "SEGSERVE_INFERENCE_TIMEOUT": "3",
                "SEGSERVE_RETRY_DELAY": "0.2",
                "SEGSERVE_RETRY_MAX_DELAY": "1",
            }
            log = tmp_path / "worker.log"
            worker = spawn([str(BIN / "segserve"), "worker"], log, cwd=tmp_path, env=env)
            try:
                job = keys.job(job_id)

                def tries() -> int:
                    return int(admin.hget(job, "attempts") or 0)

                wait_until(lambda: tries() >= 1, 60, "the worker to take the job")
                admin.config_set("min-replicas-to-write", 1)  # now no write is taken
                wait_until(
                    lambda: "could not record its try" in log.read_text(), 60, "the refused end of its try"
                )
                time.sleep(1)
                assert worker.poll() is None, log.read_text()
                admin.config_set("min-replicas-to-write", 0)
                taken = tries()
                wait_until(lambda: tries() > taken, 90, "the job's next try")
                assert worker.poll() is None, log.read_text()
            finally:
                stop_process(worker)
