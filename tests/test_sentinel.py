"""Redis with a replica and Sentinel, really started on loopback: an accepted job is on a replica before its
202, and a failover of the primary under load loses no accepted job."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.client import Client, SegserveError
from gateway.jobs import NotReplicated
from tests.harness.images import encode, scene
from tests.harness.processes import free_port, stop_process, wait_until
from tests.harness.servers import RedisServer, Stack, TorchServeServer, stack_env
from tests.jobs_support import directory_store, submit

IMAGE = encode(scene(48, 36))
MASTER = "segserve"


def sentinel_config(port: int, bind: str, directory: Path, primary: tuple[str, int]) -> str:
    """A sentinel of three (quorum 2) watching ``primary``: it calls the primary down after 1 s of silence, so
    a failover takes seconds, not the default minute."""
    host, primary_port = primary
    return (
        f"port {port}\nbind {bind}\ndir {directory}\n"
        f"sentinel monitor {MASTER} {host} {primary_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
    )


def primary_address(host: str, port: int) -> tuple[str, int]:
    """The primary that the sentinel at ``host:port`` names now."""
    import redis

    with redis.Redis(host=host, port=port, socket_connect_timeout=1, socket_timeout=2) as sentinel:
        address, primary_port = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER)
    return address.decode(), int(primary_port)


@dataclass
class ReplicatedRedis:
    """A primary, two replicas (so that one is left to confirm writes after a failover), and three sentinels
    watching them."""

    primary: RedisServer
    replicas: list[RedisServer]
    sentinel_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def addresses(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def start_sentinels(self, directory: Path) -> None:
        for port in self.sentinel_ports:
            conf = directory / f"sentinel-{port}.conf"
            conf.write_text(sentinel_config(port, "127.0.0.1", directory, ("127.0.0.1", self.primary.port)))
            self.sentinels.append(
                subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def primary_port(self) -> int:
        return primary_address("127.0.0.1", self.sentinel_ports[0])[1]

    def stop(self) -> None:
        # SIGKILL: on SIGTERM a primary waits up to 10 s for replicas that are already gone.
        processes = [*self.sentinels, *(s.process for s in (*self.replicas, self.primary) if s.process)]
        for process in processes:
            stop_process(process, signal.SIGKILL)


@pytest.fixture
def replicated(redis_binary: str, tmp_path: Path) -> Iterator[ReplicatedRedis]:
    (tmp_path / "primary").mkdir()
    primary = RedisServer(free_port(), tmp_path / "primary")
    primary.start()
    replicas = []
    for n in range(2):
        (tmp_path / f"replica{n}").mkdir()
        replicas.append(RedisServer(free_port(), tmp_path / f"replica{n}",
                                    options=("--replicaof", "127.0.0.1", str(primary.port))))  # fmt: skip
        replicas[-1].start()

    def online() -> int:
        replication = primary.client().info("replication")
        return sum(replication.get(f"slave{n}", {}).get("state") == "online" for n in range(2))

    wait_until(lambda: online() == 2, 30, "the replicas to sync")
    servers = ReplicatedRedis(primary, replicas, [free_port() for _ in range(3)])
    servers.start_sentinels(tmp_path)
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
